"""Session-wide test set-up, run before any test module is imported."""
import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported. The Triton-path tests set it at their
# own import, which is too late when an earlier test module (e.g. test_train via recbase.model)
# has already imported Triton; then those tests fail depending on the order of the files given.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
