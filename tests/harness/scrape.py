"""A server's /metrics page: fetched (``scrape``), parsed (``Samples``) and read."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


class Samples:
    """A parsed scrape: ``get(name, **labels)`` -> the one matching sample's value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]
        self.names = {s.name for s in self.samples}

    def find(self, name: str, **labels: str) -> list:
        return [
            s for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def get(self, name: str, **labels: str) -> float:
        found = self.find(name, **labels)
        assert len(found) == 1, f"{name}{labels}: expected one sample, got {found}"
        return found[0].value

    def value_or_zero(self, name: str, **labels: str) -> float:
        found = self.find(name, **labels)
        assert len(found) <= 1, f"{name}{labels}: expected at most one sample, got {found}"
        return found[0].value if found else 0.0

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """(le, cumulative count) of a histogram, in order."""
        return sorted(
            (float(s.labels["le"]), s.value) for s in self.find(name + "_bucket", **labels)
        )


def metric(url: str, name: str, **labels: str) -> float:
    """The value of the one sample ``name`` (with ``labels``) on the page at ``url``."""
    return Samples(scrape(url)).get(name, **labels)
