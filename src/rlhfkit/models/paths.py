"""Where a model name points: the bundled task's short names, a local folder, or a hub name.

A name meant as a local folder that does not exist fails at once, naming the closest folder
beside it; a hub name costs at most one short request to the hub (transformers would retry for
a minute and then print a page about the internet connection).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from huggingface_hub import constants, get_token, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import get_session, hf_raise_for_status

from rlhfkit.errors import ConfigError
from rlhfkit.tasks import kindly


def resolve_path(name: str) -> str:
    """Map the bundled task's short names to files shipped in the package; pass others through."""
    if name in ("kindly", "kindly:base"):
        return str(kindly.base_model_path())
    if name == "kindly:tokenizer":
        return str(kindly.tokenizer_path())
    if Path(name).expanduser().exists():
        return name
    if _looks_local(name):
        # fail at once: transformers would take it for a hub name and wait for the network
        raise _missing_folder(name)
    _check_hub_name(name)
    return name


HUB_TIMEOUT = 2.0  # seconds any one request to the hub may wait (huggingface_hub's default is 10)


def _looks_local(name: str) -> bool:
    """A path meant as a local folder, never a hub name ('org/name'): ./x, ../x, /x, ~/x, a\\b, a/b/c,
    x/, x/final, or org/name whose first part is a folder here (a typo under models/ or runs/)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith(("/final", "/")):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).expanduser().is_dir()


def _missing_folder(name: str) -> ConfigError:
    """The error for a local path that does not exist: the first missing level and, when one is near it,
    the closest folder beside it (difflib)."""
    typed = Path(name)
    chain = [typed, *typed.parents]
    at = next(i for i, p in enumerate(chain) if p == chain[-1] or p.expanduser().is_dir())
    base, missing = chain[at], chain[max(at - 1, 0)]
    try:
        beside = sorted(c.name for c in base.expanduser().iterdir() if c.is_dir() and not c.name.startswith("."))
    except OSError:
        beside = []
    close = difflib.get_close_matches(missing.name, beside, n=1, cutoff=0.6)
    hint = f"; the closest folder there is {base / close[0]}" if close else ""
    return ConfigError(f"model path {name!r} does not exist: there is no folder {missing}{hint} (a model is a folder "
                       "saved with save_pretrained, or a hub name like 'org/model')")


_HUB_OK: set[str] = set()


def _check_hub_name(name: str) -> None:
    """A name that is not a local folder must be in the Hugging Face cache or on a reachable hub.

    One request of at most HUB_TIMEOUT seconds decides it, instead of transformers' retries (a
    minute and a multi-line "check your internet connection" when the hub cannot be reached). A
    cached model whose hub does not answer loads from the cache in offline mode (transformers would
    otherwise ask the hub again for every file); the freshness checks of a reachable hub get the same
    bound unless HF_HUB_ETAG_TIMEOUT says otherwise.
    """
    if name in _HUB_OK:
        return

    if "HF_HUB_ETAG_TIMEOUT" not in os.environ:
        constants.HF_HUB_ETAG_TIMEOUT = HUB_TIMEOUT

    cached = any(isinstance(try_to_load_from_cache(name, f), str) for f in ("config.json", "tokenizer_config.json"))
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        if not cached:
            raise ConfigError(f"model {name!r} is not a local folder and not in the Hugging Face cache "
                              f"(HF_HUB_OFFLINE is set); pass a folder saved with save_pretrained")
    else:
        try:
            _ask_hub(name)
        except RepositoryNotFoundError:
            if not cached:
                raise ConfigError(f"model {name!r} is not a local folder and the Hugging Face hub has no model of "
                                  f"that name") from None
        except HfHubHTTPError:
            pass  # the hub answered (a token or access problem): transformers reports it in full
        except Exception as e:  # no network, DNS, proxy, timeout
            if not cached:
                raise ConfigError(f"model {name!r} is not a local folder and the Hugging Face hub cannot be reached "
                                  f"({type(e).__name__}); pass a folder saved with save_pretrained, or download it "
                                  "first") from None
            # the cached copy is used without asking the silent hub again for each file (minutes of retries)
            constants.HF_HUB_OFFLINE = True
    _HUB_OK.add(name)


def _ask_hub(name: str) -> None:
    """GET /api/models/NAME, one request of at most HUB_TIMEOUT seconds; hub errors as huggingface_hub
    raises them. Not HfApi.model_info: its headers cost a second request (the agent registry, 3 s
    more against a silent hub) on a process's first call."""

    token = get_token()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    hf_raise_for_status(get_session().get(f"{constants.ENDPOINT}/api/models/{name}", headers=headers,
                                          timeout=HUB_TIMEOUT))
