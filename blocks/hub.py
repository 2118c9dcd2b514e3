"""The Hugging Face token: a Prefect Secret block, handed to the hub client through its own variable."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from olive_grove.blocks.env import scoped_environment

HF_TOKEN_BLOCK = "hf-token"


def load_hf_token(block_name: str = HF_TOKEN_BLOCK) -> str | None:
    """The token in the named Secret block, or None when there is no such block."""
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(block_name).get())
    except ValueError:  # Prefect's answer for a block that does not exist
        return None


@contextlib.contextmanager
def hf_token(block_name: str = HF_TOKEN_BLOCK) -> Iterator[bool]:
    """Inside the block, hub downloads use the Secret block's token (huggingface_hub reads HF_TOKEN);
    yields whether there is one. The token goes nowhere else: not into a parameter, a log line, a cache
    key, a result or a file."""
    token = load_hf_token(block_name)
    with scoped_environment({"HF_TOKEN": token} if token else {}):
        yield token is not None


def save_hf_token(token: str, block_name: str = HF_TOKEN_BLOCK) -> None:
    from prefect.blocks.system import Secret

    Secret(value=token).save(block_name, overwrite=True)
