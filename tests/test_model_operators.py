"""Dedicated operators take their fields, templated fields, payload and docs from the model schemas."""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any

import pytest

from evolink_provider.models import FIELD_DOCS, KNOWN_MODELS, field_docs, schema_for
from evolink_provider.operators.base import EvolinkBaseVideoOperator
from evolink_provider.operators.evolink import (
    EvolinkHappyHorseReferenceToVideoOperator,
    EvolinkModelOperator,
    EvolinkSeedanceTextToVideoOperator,
    EvolinkSoraCharacterOperator,
)

DEDICATED = sorted(EvolinkModelOperator.__subclasses__(), key=lambda operator: operator.__name__)


def schema_fields(operator: type[EvolinkModelOperator]) -> set[str]:
    fields: set[str] = set()
    for model in operator.evolink_models:
        schema = schema_for(model)
        assert schema is not None, model
        fields |= set(schema.fields)
    return fields


@pytest.mark.parametrize("model", sorted(KNOWN_MODELS))
def test_every_schema_field_is_documented(model: str) -> None:
    schema = schema_for(model)
    assert schema is not None
    docs = field_docs(model)
    assert list(docs) == list(schema.fields)
    assert all(text.strip() for text in docs.values())


def test_no_field_doc_is_left_over_from_a_removed_field() -> None:
    for pattern, table in FIELD_DOCS.items():
        matching = [schema_for(model) for model in KNOWN_MODELS if fnmatch.fnmatchcase(model, pattern)]
        for name in table:
            assert any(schema and name in schema.fields for schema in matching), (pattern, name)


@pytest.mark.parametrize("operator", DEDICATED, ids=lambda operator: operator.__name__)
def test_signature_template_fields_and_docs_are_the_schema_fields(
    operator: type[EvolinkModelOperator],
) -> None:
    parameters = inspect.signature(operator.__init__).parameters
    fields = [name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY and name != "model"]
    assert set(fields) == schema_fields(operator)
    switch = ["model"] if len(operator.evolink_models) > 1 else []
    assert list(operator.template_fields) == [*EvolinkBaseVideoOperator.template_fields, *switch, *fields]
    for name in [*fields, *switch]:
        assert f":param {name}: " in (operator.__doc__ or ""), name


def test_the_payload_is_the_arguments_and_the_model_switch_picks_the_tier() -> None:
    operator = EvolinkSeedanceTextToVideoOperator(
        task_id="t", prompt="a calm sea", duration=6, model="seedance-2.0-mini-text-to-video"
    )
    assert operator.model_name() == "seedance-2.0-mini-text-to-video"
    assert operator.model_fields() == {
        "prompt": "a calm sea",
        "duration": 6,
        "quality": None,
        "aspect_ratio": None,
        "generate_audio": None,
        "content_filter": None,
        "model_params": None,
        "callback_url": None,
    }
    horse = EvolinkHappyHorseReferenceToVideoOperator(task_id="h", prompt="character1", image_urls=["x"])
    assert horse.model_name() == "happyhorse-1.0-reference-to-video"
    sora = EvolinkSoraCharacterOperator(task_id="s", video_url="https://x/v.mp4")
    assert (sora.model_name(), sora.model_fields()) == (
        "sora-character",
        {"video_url": "https://x/v.mp4", "timestamps": None},
    )


def test_default_args_fill_model_fields() -> None:
    from airflow.sdk import DAG

    with DAG("defaults", schedule=None, default_args={"quality": "1080p"}):
        operator = EvolinkHappyHorseReferenceToVideoOperator(task_id="h", prompt="p", image_urls=["x"])
    assert operator.model_fields()["quality"] == "1080p"


def drifting_operator(**signature: Any) -> type[EvolinkModelOperator]:
    """A HappyHorse text-to-video operator whose __init__ takes ``signature`` (name -> default)."""
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, default in signature.items()
    ]

    def __init__(self: EvolinkModelOperator, **kwargs: Any) -> None:
        raise AssertionError("never instantiated")

    __init__.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    namespace = {"evolink_models": ("happyhorse-1.0-text-to-video",), "__init__": __init__}
    return type("Drifting", (EvolinkModelOperator,), namespace)


FIELDS = {"quality": None, "aspect_ratio": None, "duration": None, "seed": None, "callback_url": None}
EMPTY = inspect.Parameter.empty


@pytest.mark.parametrize(
    ("signature", "problem"),
    [
        ({"prompt": EMPTY, **FIELDS, "negative_prompt": None}, "negative_prompt is not a field"),
        ({"prompt": EMPTY, **{**FIELDS, "seed": 0}}, "seed must default to None"),
        ({"prompt": None, **FIELDS}, "prompt must have no default"),
        ({"prompt": EMPTY, **{k: v for k, v in FIELDS.items() if k != "seed"}}, "no parameter seed"),
        ({"prompt": EMPTY, **FIELDS, "model": "happyhorse-1.1-text-to-video"}, "model must be"),
    ],
)
def test_a_signature_that_drifts_from_the_schema_fails_when_the_class_is_defined(
    signature: dict[str, Any], problem: str
) -> None:
    with pytest.raises(TypeError, match=problem):
        drifting_operator(**signature)


def test_the_matching_signature_is_accepted() -> None:
    operator = drifting_operator(prompt=EMPTY, **FIELDS)
    assert operator.evolink_field_names == ("prompt", *FIELDS)
