"""Sessions outside the process: the checksummed chunk stream (ExportSession /
ImportSession, snapshot files) and the snapshot directory loaded at start."""
