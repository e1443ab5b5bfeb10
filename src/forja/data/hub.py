"""Hugging Face datasets as a source of `forja data`: `hf:owner/name` (the hub, or its local cache with
HF_HUB_OFFLINE=1) or `hf:./folder` (a dataset saved with save_to_disk, or data files in the hub's layout).

`forja data prepare hf:owner/name --split train --subset es --map question=pregunta,answer=respuesta --out t.jsonl`
reads it with `datasets.load_dataset` and then as any table: the format detected, or the mapping given.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from forja.data import DataError, ReadOptions, _Row, _Table

PREFIX = "hf:"
DEFAULT_SPLIT = "train"
# Unreachable, datasets retries each request five times with back-off (about 25 s before it says so);
# one connection attempt of this many seconds tells the same at once.
REACH_TIMEOUT_S = 3.0
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_hub(path: str | Path) -> bool:
    return str(path).startswith(PREFIX)


def read(ref: str, options: ReadOptions) -> _Table:
    """The rows of one split of a dataset, as a table (keys lower-cased, row numbers from 1)."""
    name = ref[len(PREFIX):]
    try:
        import datasets
    except ImportError:
        raise DataError(f"{ref}: reading Hugging Face datasets needs the datasets package "
                        "(pip install 'forja[hub]', or datasets==5.2.0)") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    split = options.split or DEFAULT_SPLIT
    local = Path(name).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "dataset_info.json").is_file()):
            dataset: Any = datasets.load_from_disk(str(local))  # written by save_to_disk
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(f'{ref}: no split "{split}"; the splits are {", ".join(dataset)} (give one with --split)')
                dataset = dataset[split]
        else:
            if not local.is_dir():
                if not HUB_ID.fullmatch(name):
                    raise DataError(f"{ref}: neither a folder nor a hub id owner/name (e.g. hf:ImadSaddik/BoDmaghDataset)")
                _check_reachable(ref)
            dataset = datasets.load_dataset(str(local) if local.is_dir() else name, name=options.subset, split=split,
                                            cache_dir=os.environ.get("HF_DATASETS_CACHE"))
    except DataError:
        raise
    except ValueError as error:  # an unknown split or subset, in datasets' own words
        reason = str(error).splitlines()[0]
        flag = "--split" if "split" in reason.lower() else "--subset"
        raise DataError(f"{ref}: {reason} (give it with {flag})") from None
    except Exception as error:  # not found, gated, offline without a cached copy: datasets' many error types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{ref}: cannot load the dataset ({reason})") from None
    columns = [str(c).strip().lower() for c in dataset.column_names]
    rows: list[_Row | Any] = [
        _Row(f"row {number}", str(number), dict(zip(columns, record.values())))
        for number, record in enumerate(dataset, 1)
    ]
    detail = f'split "{split}"' + (f', subset "{options.subset}"' if options.subset else "")
    return _Table(columns, rows, detail)


def _check_reachable(ref: str) -> None:
    """Fail at once when the hub cannot be reached, unless HF_HUB_OFFLINE asks for the local cache."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=REACH_TIMEOUT_S).close()
    except OSError as error:
        raise DataError(
            f"{ref}: cannot reach the Hugging Face hub at {endpoint} ({error.strerror or error}); connect to the "
            "network, or set HF_HUB_OFFLINE=1 to use a copy in the cache, or give a folder as hf:./folder"
        ) from None
