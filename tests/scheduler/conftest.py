"""Tokenizer directories trained once per session (tests/hf_tokenizer.py)."""

from __future__ import annotations

import pytest

from tests.hf_tokenizer import CHATML_GENERATION, REWRITING, save_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def marker_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("model") / "marked",
                          chat_template=CHATML_GENERATION)


@pytest.fixture(scope="session")
def rewriting_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("model") / "rewriting",
                          chat_template=REWRITING)
