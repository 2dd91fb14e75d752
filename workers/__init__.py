"""Quorum workers: image decoding, face detection/alignment and the embedding engines."""
