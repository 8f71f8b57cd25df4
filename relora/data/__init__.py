"""The data stage (docs/design.md, Data and Files): corpus -> tokenizer -> token shards,
held-out domains, probe batch and BLiMP pairs, offline by default.

Other stages read the data directory through this API:

    from relora.data import read_manifest, verify_manifest
    manifest = verify_manifest(data_dir)          # sizes + sha256 of every file, or ManifestError
    manifest["eos_id"], manifest["vocab_size"]   # train.npy is joined by eos_id
    np.load(data_dir / "train.npy", mmap_mode="r")
"""

from .manifest import ManifestError, read_manifest, verify_manifest, write_manifest

__all__ = ["ManifestError", "read_manifest", "verify_manifest", "write_manifest"]
