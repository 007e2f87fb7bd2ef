"""Adapter checkpoints named by a Hugging Face Hub id (`user/repo`), resolved to a local folder.

`surgeon.load_adapter(model, "user/repo", revision="v2")` and `--adapter user/repo` accept what
peft's `from_pretrained` accepts: a local folder, or a Hub repository at a branch, tag or commit.
The download goes through huggingface_hub's `snapshot_download` (its cache, token, `HF_HOME`,
`HF_HUB_OFFLINE`), fetching only the adapter files. Offline, or with the Hub unreachable, the
cached snapshot is used; when there is none, one `HubError` sentence says why, as `--model` does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from surgeon.errors import UserError

# what a PEFT adapter repository holds (every adapter: the default at the top, others in subfolders)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                 "*/adapter_config.json", "*/adapter_model.safetensors", "*/adapter_model.bin")
# `org/name`: letters, digits, `-_.` (a bare `name` stays a local path, as `--model` reads it)
_HUB_ID = re.compile(r"^[\w][\w.-]*/[\w][\w.-]*$")


class HubError(UserError, OSError):
    """An adapter id that names no local folder and cannot be fetched from the Hub."""


def is_hub_id(name: str) -> bool:
    """Whether `name` can only be a Hub id: not an existing path, and in `org/name` form."""
    return (not os.path.exists(os.path.expanduser(name)) and _HUB_ID.match(name) is not None
            and ".." not in name and not name.startswith((".", "/", "~")))


def adapter_folder(path_or_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """The local folder for an adapter: `path_or_id` itself if it is a path, else the Hub
    snapshot of repository `path_or_id` at `revision` (default: the main branch).

    Example:
        >>> adapter_folder("out/adapter")                       # a folder: itself
        >>> adapter_folder("user/llama-lora", revision="v2")    # ~/.cache/huggingface/hub/.../snapshots/<sha>
    """
    if isinstance(path_or_id, os.PathLike) or not is_hub_id(str(path_or_id)):
        if revision is not None:
            raise HubError(f"revision={revision!r} is for Hub ids; `{path_or_id}` is a local path")
        return Path(path_or_id).expanduser()
    return _download(str(path_or_id), revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision `{revision}`" if revision else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(ADAPTER_FILES)))
    except RevisionNotFoundError:
        raise HubError(f"adapter `{repo_id}`: the Hub repository has no revision `{revision}`") from None
    except RepositoryNotFoundError:
        raise HubError(f"adapter `{repo_id}`: no such local folder, and no such repository on the "
                       "Hugging Face Hub (or it is private)") from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else "the Hugging Face Hub cannot be reached")
        raise HubError(f"adapter `{repo_id}`{at}: no such local folder, and as a Hub id: {why} and it "
                       "is not in the local cache") from None
    except HfHubHTTPError as error:
        raise HubError(f"adapter `{repo_id}`{at}: the Hugging Face Hub refused: {error}") from None
    if not (folder / "adapter_config.json").is_file():
        raise HubError(f"adapter `{repo_id}`{at}: the repository has no adapter_config.json at its top; "
                       "is it a PEFT adapter?")
    return folder
