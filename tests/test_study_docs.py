"""The scripts under docs/study that rewrite the project's own documents."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    path = os.path.join(REPO, "docs", "study", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


APPENDIX_DOC = """# Results

## Tuning (issue #28)

#### idm

old idm text, outside the appendix: kept

## Appendix: the tuning grids, CIFAR-10 IPC 1

Opening paragraph, kept.

#### idm

old grid

#### iid

Not tuned yet.

## Later section

kept too
"""


def test_splice_replaces_only_the_appendix_method_sections():
    module = _load("tuning_appendix")
    spliced = module.splice(APPENDIX_DOC, "#### idm\n\nnew grid\n\n#### iid\n\nnew iid grid\n")
    assert spliced == APPENDIX_DOC.replace(
        "#### idm\n\nold grid\n\n#### iid\n\nNot tuned yet.\n",
        "#### idm\n\nnew grid\n\n#### iid\n\nnew iid grid\n")
    assert "old idm text, outside the appendix: kept" in spliced


def test_splice_at_the_end_of_the_document_and_idempotent():
    module = _load("tuning_appendix")
    document = APPENDIX_DOC.split("## Later section")[0].rstrip("\n") + "\n"
    once = module.splice(document, "#### idm\n\nnew grid\n")
    assert once.endswith("Opening paragraph, kept.\n\n#### idm\n\nnew grid\n")
    assert module.splice(once, "#### idm\n\nnew grid\n") == once


def test_splice_refuses_a_document_without_one_appendix():
    module = _load("tuning_appendix")
    with pytest.raises(ValueError, match="found 0"):
        module.splice("# Results\n\n## Other\n", "#### idm\n")
    twice = APPENDIX_DOC + "\n## Appendix: the tuning grids, again\n"
    with pytest.raises(ValueError, match="found 2"):
        module.splice(twice, "#### idm\n")
