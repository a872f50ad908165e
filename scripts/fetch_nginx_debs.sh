#!/usr/bin/env bash
# Download nginx as Debian packages into .deb/, to carry to the GPU machine (no network
# there, no nginx), where benchmarks/multiprocess.py --nginx-deb-dir .deb unpacks them
# with `dpkg -x` under /tmp/nginx-root and runs that nginx with LD_LIBRARY_PATH on the
# unpacked libraries: nothing is installed there.
#
#   bash scripts/fetch_nginx_debs.sh [DIR]     # DIR defaults to .deb (in the repo root)
#
# Run it on a Debian/Ubuntu x86-64 machine with apt sources (this one: Debian bookworm).
# It takes the package that holds /usr/sbin/nginx (`nginx`; `nginx-core` on older
# releases, where `nginx` is a metapackage) and every library it links except glibc:
# libssl3, libpcre2-8-0, zlib1g, libcrypt1. Carrying them even where the GPU machine has
# its own keeps the binary with the libraries it was built against; glibc stays the
# machine's (newer glibc runs older binaries). nginx-common (config files only) is not
# needed: the benchmark writes its own config and passes -p, -c and -e.
#
# Keep the folder out of git without touching .gitignore:
#   echo '/.deb/' >> "$(git rev-parse --git-common-dir)/info/exclude"
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.deb}

# Depends of a package, the first of each `a | b` alternative only, without <virtual> marks.
depends() {
  apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances "$1" \
    | awk '/^ *\|Depends:/ { if (!alt) print $2; alt = 1; next }
           /^ *Depends:/   { if (!alt) print $2; alt = 0 }' \
    | tr -d '<>'
}

pkgs=(nginx)
for dep in $(depends nginx); do
  case "$dep" in
    nginx-core|nginx-full|nginx-light|nginx-extras) pkgs+=("$dep") ;;
  esac
done
# The libraries of every package above (a binary in nginx-core brings its own list).
for pkg in "${pkgs[@]}"; do
  for dep in $(depends "$pkg"); do
    case "$dep" in
      libc6|libc-bin) ;;  # glibc: the machine's own
      lib*|zlib1g) pkgs+=("$dep") ;;
    esac
  done
done
mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)

mkdir -p "$DEST"
rm -f "$DEST"/*.deb
# apt-get download writes into the current folder; as root it warns that the _apt user
# cannot write there ("unsandboxed"), which is harmless.
(cd "$DEST" && apt-get download "${pkgs[@]}")
echo "fetch_nginx_debs.sh: ${#pkgs[@]} packages in $DEST: ${pkgs[*]}"
ls -l "$DEST"/*.deb
