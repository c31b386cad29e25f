"""Shared fixtures: tiny models and text built offline, never downloaded."""

from __future__ import annotations

import pytest
import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model learns the words it sees.\n"
    "Mixture-of-experts layers route each token to a few experts; the rest stay idle.\n"
    "Grüße aus München: ¿qué tal? 東京 is far away, and emoji 🙂 still encode as bytes.\n"
) * 3


@pytest.fixture(scope="session")
def text() -> str:
    return TEXT


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
