"""The EvoLink operators a DAG uses: one per model, plus a generic one for any EvoLink video model.

Each dedicated operator names its models; their fields, limits and parameter docs come from the schema in
:mod:`evolink_provider.models` (declared once there). Everything they share (validate, submit or reattach,
wait, collect) is :class:`~evolink_provider.operators.base.EvolinkBaseVideoOperator`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache
from typing import Any

from airflow.sdk import BaseOperator

from evolink_provider.models import field_docs, schema_for
from evolink_provider.operators.base import EvolinkBaseVideoOperator

__all__ = [
    "EvolinkBaseVideoOperator",
    "EvolinkHappyHorseReferenceToVideoOperator",
    "EvolinkHappyHorseTextToVideoOperator",
    "EvolinkModelOperator",
    "EvolinkSeedanceTextToVideoOperator",
    "EvolinkSoraCharacterOperator",
    "EvolinkVideoGenerationOperator",
]


class EvolinkVideoGenerationOperator(EvolinkBaseVideoOperator):
    """Run any EvoLink video model.

    Fields are validated against the model's schema when the model is known
    (:data:`evolink_provider.models.KNOWN_MODELS`) and passed through otherwise, so new models work the day
    they ship. Model fields go either as keyword arguments (``duration=5``) or in ``request_fields``
    (which ``.partial(...).expand(...)`` can map over).

    :param model: the EvoLink model name, e.g. ``seedance-2.0-text-to-video``.
    :param prompt: the text prompt, when the model takes one.
    :param request_fields: further model fields, e.g. ``{"duration": 8, "quality": "1080p"}``.
    """

    template_fields: Sequence[str] = (
        *EvolinkBaseVideoOperator.template_fields,
        "model",
        "prompt",
        "request_fields",
    )
    template_fields_renderers = {"request_fields": "json"}

    def __init__(
        self,
        *,
        model: str,
        prompt: str | None = None,
        request_fields: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        operator_kwargs = {k: v for k, v in kwargs.items() if k in _operator_argument_names()}
        extra_fields = {k: v for k, v in kwargs.items() if k not in operator_kwargs}
        super().__init__(**operator_kwargs)
        self.model = model
        self.prompt = prompt
        self.request_fields = {**(request_fields or {}), **extra_fields}

    def model_name(self) -> str:
        return self.model

    def model_fields(self) -> dict[str, Any]:
        return {"prompt": self.prompt, **(self.request_fields or {})}


@cache
def _operator_argument_names() -> frozenset[str]:
    """Names BaseOperator and the shared base accept: everything else given to the generic operator is a
    model field."""
    names: set[str] = set()
    for klass in (BaseOperator, EvolinkBaseVideoOperator):
        names.update(inspect.signature(klass.__init__).parameters)
    return frozenset(names - {"self", "kwargs", "args"})


class EvolinkModelOperator(EvolinkBaseVideoOperator):
    """Base of the operators dedicated to a model, whose fields come from the model's schema.

    A subclass names its models in ``evolink_models`` (the default first) and writes a typed, keyword-only
    ``__init__`` whose parameters are exactly the models' fields, plus ``model`` when there is a choice,
    and whose body is ``super().__init__(**kwargs)`` then ``self.keep_model_fields(locals())``. From the
    schema in :mod:`evolink_provider.models` the class then gets its ``template_fields``, its payload
    (:meth:`model_fields`) and the ``:param:`` lines of its docstring; a signature that differs from the
    schema fails when the class is defined, so the two cannot drift apart.
    """

    #: The models this operator runs; the first is the default of its ``model`` argument.
    evolink_models: tuple[str, ...] = ()
    #: The model fields, in the order of the signature (set from it when the class is defined).
    evolink_field_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.evolink_models:
            return
        docs: dict[str, str] = {}
        for model in reversed(cls.evolink_models):  # the default model's wording wins
            docs.update(field_docs(model))
        names = _checked_field_names(cls, docs)
        switch = ("model",) if len(cls.evolink_models) > 1 else ()
        cls.evolink_field_names = names
        cls.template_fields = (*EvolinkBaseVideoOperator.template_fields, *switch, *names)
        lines = [f":param {name}: {docs[name]}" for name in names]
        if switch:
            lines.append(f":param model: {_spoken_list(cls.evolink_models)}.")
        cls.__doc__ = "\n\n".join([inspect.cleandoc(cls.__doc__ or ""), "\n".join(lines)])

    def keep_model_fields(self, arguments: dict[str, Any]) -> None:
        """Store the ``__init__`` arguments (its ``locals()``) that are model fields, or the model."""
        for name in (*self.evolink_field_names, "model"):
            if name in arguments:
                setattr(self, name, arguments[name])

    def model_name(self) -> str:
        return str(getattr(self, "model", self.evolink_models[0]))

    def model_fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.evolink_field_names}


def _checked_field_names(cls: type[EvolinkModelOperator], docs: dict[str, str]) -> tuple[str, ...]:
    """The model fields of ``cls.__init__``, which must be the schemas' fields: required ones without a
    default, the others defaulting to ``None``, and ``model`` defaulting to the first model."""
    parameters = {
        name: parameter
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    model = parameters.pop("model", None)
    default = cls.evolink_models[0]
    schema = schema_for(default)
    required = schema.required if schema else frozenset()
    problems = [f"no parameter {name}" for name in docs if name not in parameters]
    problems += [
        f"{name} is not a field of {' or '.join(cls.evolink_models)}"
        for name in parameters
        if name not in docs
    ]
    problems += [
        f"{name} must {'have no default' if name in required else 'default to None'}"
        for name, parameter in parameters.items()
        if (parameter.default is inspect.Parameter.empty) != (name in required)
        or (name not in required and parameter.default is not None)
    ]
    if (model is None) != (len(cls.evolink_models) == 1) or (model and model.default != default):
        problems.append(
            f"model must be a parameter (defaulting to {default!r}) if and only if there is a choice"
        )
    if problems:
        raise TypeError(f"{cls.__name__}.__init__ does not match the schema: {'; '.join(problems)}")
    return tuple(parameters)


def _spoken_list(models: Sequence[str]) -> str:
    names = [f"``{model}``" for model in models]
    names[0] += " (default)"
    return ", ".join(names[:-1]) + " or " + names[-1]


class EvolinkHappyHorseReferenceToVideoOperator(EvolinkModelOperator):
    """Generate a video from 1-9 reference images with HappyHorse (``happyhorse-1.0-reference-to-video``).

    The prompt names the images ``character1``, ``character2``, ... in list order.
    """

    evolink_models = ("happyhorse-1.0-reference-to-video", "happyhorse-1.1-reference-to-video")

    def __init__(
        self,
        *,
        prompt: str,
        image_urls: list[str] | str,
        quality: str | None = None,
        aspect_ratio: str | None = None,
        duration: int | str | None = None,
        seed: int | str | None = None,
        callback_url: str | None = None,
        model: str = "happyhorse-1.0-reference-to-video",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.keep_model_fields(locals())


class EvolinkHappyHorseTextToVideoOperator(EvolinkModelOperator):
    """Generate a video from text with HappyHorse (``happyhorse-1.0-text-to-video``)."""

    evolink_models = ("happyhorse-1.0-text-to-video", "happyhorse-1.1-text-to-video")

    def __init__(
        self,
        *,
        prompt: str,
        quality: str | None = None,
        aspect_ratio: str | None = None,
        duration: int | str | None = None,
        seed: int | str | None = None,
        callback_url: str | None = None,
        model: str = "happyhorse-1.0-text-to-video",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.keep_model_fields(locals())


class EvolinkSeedanceTextToVideoOperator(EvolinkModelOperator):
    """Generate a video from text with Seedance 2.0 (``seedance-2.0-fast-text-to-video`` by default)."""

    evolink_models = (
        "seedance-2.0-fast-text-to-video",
        "seedance-2.0-text-to-video",
        "seedance-2.0-mini-text-to-video",
    )
    template_fields_renderers = {"model_params": "json"}

    def __init__(
        self,
        *,
        prompt: str,
        duration: int | str | None = None,
        quality: str | None = None,
        aspect_ratio: str | None = None,
        generate_audio: bool | str | None = None,
        content_filter: bool | str | None = None,
        model_params: dict[str, Any] | str | None = None,
        callback_url: str | None = None,
        model: str = "seedance-2.0-fast-text-to-video",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.keep_model_fields(locals())


class EvolinkSoraCharacterOperator(EvolinkModelOperator):
    """Extract a reusable character from a video with ``sora-character``.

    Returns the task object; ``result_data["character_name"]`` (e.g. ``chr_Axtjik3O#``) and
    ``result_data["profile_picture_url"]`` (an image, valid 24 h) go downstream.

    Availability depends on the EvoLink account: the model's page left EvoLink's public docs in 2026-05
    with the Sora-2 beta models, and a key without access gets HTTP 403 ``model_access_denied``.
    """

    evolink_models = ("sora-character",)

    def __init__(self, *, video_url: str, timestamps: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_model_fields(locals())
