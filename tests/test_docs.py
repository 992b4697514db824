"""The README's reference of operator arguments and editing helpers is the code's (evolink_provider.docs)."""

from __future__ import annotations

from evolink_provider.docs import reference, replace_in, section_of
from tests.conftest import REPO


def test_the_readme_reference_equals_the_code() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert section_of(readme) == reference(), (
        "README.md's reference is out of date: run `python -m evolink_provider.docs README.md`"
    )


def test_the_reference_names_what_a_user_needs() -> None:
    text = reference()
    for needed in (
        "`video_url`",
        "`timestamps`",
        "`request_fields`",
        "`local_checks`",
        "`prompt_policy`",
        "`seedance-2.0-fast-image-to-video`",
        "`concat(sources",
        "`probe(path",
        "EvolinkUploadImagesOperator",
    ):
        assert needed in text, needed
    assert replace_in("a<!-- reference:start -->old<!-- reference:end -->b", "new\n") == (
        "a<!-- reference:start -->\nnew\n<!-- reference:end -->b"
    )
