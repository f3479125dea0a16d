"""The bottom room: storage, the one image decode, manifests, and the output table's contract."""
