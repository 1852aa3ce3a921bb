"""Hugging Face-style weights for every model family: `model.save_pretrained(dir)` writes
`model.safetensors` and `config.json` (the constructor's arguments); `Class.from_pretrained(dir)`
builds the model from that config and loads the weights, with identical outputs.

This is huggingface_hub's `PyTorchModelHubMixin` with two defaults changed for a local folder: keys
must match exactly (`strict=True`; the mixin's own default silently skips missing keys), and nothing
touches the network. `push_to_hub` / `from_pretrained("user/repo")` come with the mixin unchanged
(untested here: this machine has no internet). A loaded model is in eval mode, as in transformers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import PyTorchModelHubMixin
from huggingface_hub.constants import SAFETENSORS_SINGLE_FILE


class HubMixin(PyTorchModelHubMixin, library_name="hiertrans", repo_url="https://github.com/hiertrans/hiertrans"):
    """`save_pretrained` / `from_pretrained` / `push_to_hub` for a model whose constructor arguments
    are JSON-able (or have coders: see `huggingface_hub.ModelHubMixin`)."""

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs: Any):
        if os.path.isdir(model_id):
            path = os.path.join(model_id, SAFETENSORS_SINGLE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{model_id!r} has no {SAFETENSORS_SINGLE_FILE}: not a folder written by "
                                        f"save_pretrained")
            return cls._load_as_safetensor(cls(**model_kwargs), path, map_location, strict)
        return super()._from_pretrained(model_id=model_id, revision=revision, cache_dir=cache_dir,
                                        force_download=force_download, local_files_only=local_files_only,
                                        token=token, map_location=map_location, strict=strict, **model_kwargs)
