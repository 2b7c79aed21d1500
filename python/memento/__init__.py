"""memento: lazy asynchronous snapshots of training state into per-node agents (Python client)."""
from .client import (BF16, BOOL, CUDA, F16, F32, F64, F8E4M3, F8E5M2, HOST, I8, I32, I64, LATEST, U8, Blob, Client,
                     MementoError, NothingToRestore)

__version__ = "0.1.0"
__all__ = ["Client", "Blob", "MementoError", "NothingToRestore", "LATEST", "HOST", "CUDA", "F64", "F32", "F16",
           "BF16", "F8E4M3", "F8E5M2", "I64", "I32", "I8", "U8", "BOOL"]
