"""Text <-> token ids, and chat templates, for a Hugging Face checkpoint directory.

Built on the ``tokenizers`` package and jinja2 only: the serving runtime does not import
transformers. Encoding, decoding and chat-template rendering match what transformers'
``AutoTokenizer`` does for checkpoints that ship a ``tokenizer.json`` (the fast-tokenizer
format every current chat model publishes).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Named special tokens that transformers exposes to chat templates as variables.
NAMED_SPECIAL_TOKENS: tuple[str, ...] = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Names under which clients send a message's reasoning; templates read the first.
_REASONING_FIELDS: tuple[str, ...] = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, special-token ids and chat template.

    Instances are immutable after construction and safe to share between threads.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        add_bos_token: bool = False,
    ) -> None:
        """Wrap ``backend``; prefer :meth:`from_pretrained`.

        ``special_tokens`` maps names such as ``"bos_token"`` and ``"eos_token"`` to token
        strings, each of which must be in ``backend``'s vocabulary (ValueError otherwise); they
        are also the variables chat templates see. ``chat_templates`` maps template names to
        jinja2 sources; ``"default"`` is the one :meth:`apply_chat_template` uses.
        ``extra_eos_token_ids`` (for instance from ``generation_config.json``) are added to the
        id of ``eos_token`` to form :attr:`eos_token_ids`. With ``add_bos_token``, encoding with
        special tokens prepends ``bos_token`` unless the backend's post-processor already does.

        The tokenizer takes ``backend`` over and switches off any truncation and padding
        configured in it: :meth:`encode` always returns every token, and callers decide what to
        do with overlong input.
        """
        self._backend = backend
        self._backend.no_truncation()
        self._backend.no_padding()
        self._special_tokens: dict[str, str] = dict(special_tokens or {})
        self._special_ids: dict[str, int] = {}
        for name, token in self._special_tokens.items():
            if not isinstance(token, str):
                raise ValueError(f"special token {name} must be a string, got {token!r}")
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"special token {name}={token!r} is not in the vocabulary")
            self._special_ids[name] = token_id

        self._vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        eos_ids = set(extra_eos_token_ids)
        if "eos_token" in self._special_ids:
            eos_ids.add(self._special_ids["eos_token"])
        # Ids past the tokenizer's vocabulary are allowed: models often pad their vocabulary.
        bad = sorted(i for i in eos_ids if i < 0)
        if bad:
            raise ValueError(f"eos token ids must not be negative, got {bad}")
        self._eos_token_ids = frozenset(eos_ids)

        self._chat_templates: dict[str, str] = dict(chat_templates or {})

        bos_id = self._special_ids.get("bos_token")
        self._prepend_bos = (
            add_bos_token
            and bos_id is not None
            and backend.encode("", add_special_tokens=True).ids[:1] != [bos_id]
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Load the tokenizer of the checkpoint in ``model_dir``.

        Reads ``tokenizer.json`` (required: FileNotFoundError naming the path otherwise) and,
        when present, ``tokenizer_config.json`` (special tokens, ``add_bos_token``, chat
        template), ``special_tokens_map.json`` (named special tokens missing from the config),
        ``chat_template.jinja`` and ``additional_chat_templates/*.jinja`` (which take priority
        over the config's template, as in transformers), and ``generation_config.json`` and
        ``config.json`` (their ``eos_token_id``, an int or a list, joins :attr:`eos_token_ids`);
        ``chat_template.json`` is the template of last resort. Named special tokens missing from
        ``tokenizer.json`` are added as special tokens, as transformers does.

        ``tokenizer.json``'s post-processor decides what ``encode(add_special_tokens=True)``
        adds. One deliberate difference from transformers 5, which ignores ``add_bos_token``
        whenever ``tokenizer.json`` exists: when the config sets it and the post-processor adds
        no BOS, BOS is prepended, as the model was trained with it.
        """
        model_dir = Path(model_dir)
        tokenizer_path = model_dir / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {model_dir} (looked for {tokenizer_path})"
            )
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_path))

        config = _read_json(model_dir / "tokenizer_config.json")
        special_tokens: dict[str, str] = {}
        for name in NAMED_SPECIAL_TOKENS:
            token = _token_content(config.get(name))
            if token is not None:
                special_tokens[name] = token
        legacy_map = _read_json(model_dir / "special_tokens_map.json")
        for name in NAMED_SPECIAL_TOKENS:
            token = _token_content(legacy_map.get(name))
            if token is not None:
                special_tokens.setdefault(name, token)
        # Model-specific named tokens (transformers 5's dict form of extra_special_tokens) are
        # template variables too.
        extra = config.get("extra_special_tokens")
        extra_tokens: list[Any] = []
        if isinstance(extra, Mapping):
            for name, value in extra.items():
                token = _token_content(value)
                if token is not None:
                    special_tokens.setdefault(str(name), token)
        elif isinstance(extra, list):
            extra_tokens = list(extra)
        extra_tokens += config.get("additional_special_tokens") or []

        to_add = [
            tokenizers.AddedToken(token, special=True, normalized=False)
            for token in dict.fromkeys(
                [*special_tokens.values(), *filter(None, map(_token_content, extra_tokens))]
            )
            if backend.token_to_id(token) is None
        ]
        if to_add:
            backend.add_special_tokens(to_add)

        chat_templates = _chat_templates(model_dir, config.get("chat_template"))

        extra_eos: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            model_config = _read_json(model_dir / name)
            extra_eos |= _int_ids(model_config.get("eos_token_id"), model_dir / name)
            text_config = model_config.get("text_config")
            if isinstance(text_config, Mapping):
                extra_eos |= _int_ids(text_config.get("eos_token_id"), model_dir / name)

        return cls(
            backend,
            special_tokens=special_tokens,
            chat_templates=chat_templates,
            extra_eos_token_ids=extra_eos,
            add_bos_token=bool(config.get("add_bos_token", False)),
        )

    # ---- vocabulary ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids: the base vocabulary plus added (special) tokens."""
        return self._vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: ``eos_token`` plus the checkpoint's configured eos ids."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        """Id of ``bos_token``, or None when the tokenizer has none."""
        return self._special_ids.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of ``eos_token`` from the tokenizer config, or None; see :attr:`eos_token_ids`."""
        return self._special_ids.get("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id of ``pad_token``, or None when the tokenizer has none."""
        return self._special_ids.get("pad_token")

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens (``{"eos_token": "<|im_end|>", ...}``); a copy."""
        return dict(self._special_tokens)

    def vocab(self) -> dict[str, int]:
        """Every vocabulary entry (added tokens included) and its id; a copy."""
        return dict(self._backend.get_vocab(with_added_tokens=True))

    def backend_json(self) -> str:
        """The backend's ``tokenizer.json`` text (model, pre-tokenizer, decoder...)."""
        return str(self._backend.to_str())

    def token_to_id(self, token: str) -> int | None:
        """Id of the vocabulary entry ``token`` (e.g. ``"Ġthe"``), or None if absent."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of ``token_id``, or None if it is not a valid id."""
        if token_id < 0:
            return None
        return self._backend.id_to_token(token_id)

    # ---- encode / decode ----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, never truncated.

        Special tokens written in ``text`` (e.g. ``"<|im_end|>"``) encode as their single ids.
        ``add_special_tokens`` applies the tokenizer's post-processor (e.g. a BOS prefix);
        pass False for text that is already fully formatted, such as a rendered chat template.
        """
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids.insert(0, self._special_ids["bos_token"])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; with ``skip_special_tokens``, tokens marked special are dropped.

        Ids at or past :attr:`vocab_size` (a model's padded vocabulary) decode to nothing;
        negative ids raise ValueError.
        """
        ids = list(ids)
        if ids and min(ids) < 0:
            raise ValueError(f"cannot decode negative token id {min(ids)}")
        return str(self._backend.decode(ids, skip_special_tokens=skip_special_tokens))

    # ---- chat ---------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default chat template source, or None when the checkpoint has none."""
        return self._chat_templates.get("default")

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the checkpoint's chat template, as transformers does.

        Each message must be a dict with a string ``"role"``; keys whose value is None are
        dropped and reasoning sent as ``thinking``/``reasoning`` is also passed as
        ``reasoning_content``, as in transformers. ``tools`` are JSON-schema dicts. Extra
        ``kwargs`` (e.g. ``enable_thinking=False``, ``documents=[...]``) become template
        variables and override the special-token variables (``bos_token``, ``eos_token``...).
        The template named ``"tool_use"`` is used when ``tools`` is given and the checkpoint has
        one, else ``"default"``.

        Raises ValueError when the checkpoint has no chat template, the conversation is empty,
        a message or tool is malformed, or the template itself rejects the input (its
        ``raise_exception``). Encode the result with ``add_special_tokens=False``, or use
        :meth:`encode_chat`, to avoid adding a second BOS.
        """
        template = self._compiled_template(use_tools=tools is not None)
        if not isinstance(messages, list) or not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        chat = [_normalize_message(i, message) for i, message in enumerate(messages)]
        if tools is not None:
            for i, tool in enumerate(tools):
                if not isinstance(tool, dict):
                    raise ValueError(
                        f"tools[{i}] must be a JSON-schema dict, got {type(tool).__name__}"
                    )
        variables: dict[str, Any] = {**self._special_tokens, **kwargs}
        variables.setdefault("documents", None)
        try:
            return template.render(
                messages=chat,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template rejected the conversation: {exc}") from exc
        except RecursionError as exc:  # JSON nested deeper than the template can render
            raise ValueError("the conversation or its tools are nested too deeply") from exc

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of :meth:`apply_chat_template`'s text, without added special tokens.

        Equals transformers' ``apply_chat_template(..., tokenize=True)``.
        """
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def _compiled_template(self, use_tools: bool) -> jinja2.Template:
        if not self._chat_templates:
            raise ValueError(
                "this model has no chat template (no chat_template in tokenizer_config.json "
                "and no chat_template.jinja); send a raw prompt instead of chat messages"
            )
        if use_tools and "tool_use" in self._chat_templates:
            name = "tool_use"
        elif "default" in self._chat_templates:
            name = "default"
        else:
            raise ValueError(
                f"this model has chat templates {sorted(self._chat_templates)} but none named "
                "'default'"
            )
        return _compile_template(self._chat_templates[name])

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos_token_ids={sorted(self.eos_token_ids)}, "
            f"bos_token_id={self.bos_token_id}, chat_template={self.chat_template is not None})"
        )


# ---- loading helpers ---------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` if the file does not exist."""
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as configs write it (a string, or a dict with ``"content"``), or None."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _int_ids(value: Any, source: Path) -> set[int]:
    """``eos_token_id`` as configs write it: absent, an int, or a list of ints."""
    if value is None:
        return set()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(
            f"eos_token_id in {source} must be an int or a list of ints, got {value!r}"
        )
    return set(values)


def _chat_templates(model_dir: Path, configured: Any) -> dict[str, str]:
    """Named chat templates; template files take priority over ``tokenizer_config.json``."""
    templates: dict[str, str] = {}
    if isinstance(configured, str):
        templates["default"] = configured
    elif isinstance(configured, list):
        for entry in configured:
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ValueError(
                    f"chat_template entries in {model_dir / 'tokenizer_config.json'} must be "
                    f"{{'name': str, 'template': str}}, got {entry!r}"
                )
            templates[entry["name"]] = entry["template"]
    elif configured is not None:
        raise ValueError(
            f"chat_template in {model_dir / 'tokenizer_config.json'} must be a string or a list "
            f"of named templates, got {type(configured).__name__}"
        )

    from_files: dict[str, str] = {}
    default_file = model_dir / "chat_template.jinja"
    if default_file.is_file():
        from_files["default"] = default_file.read_text(encoding="utf-8")
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            from_files[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if from_files:
        return from_files
    legacy = _read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(legacy, str) and not templates:
        templates["default"] = legacy
    return templates


def _normalize_message(index: int, message: Any) -> dict[str, Any]:
    """A copy of ``message`` as transformers passes it to templates, or ValueError."""
    if not isinstance(message, dict):
        raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str):
        raise ValueError(f"messages[{index}] needs a string 'role', got {role!r}")
    chat = {key: value for key, value in message.items() if value is not None}
    reasoning = next((chat[k] for k in _REASONING_FIELDS if k in chat), None)
    if reasoning is not None:
        chat = {"thinking": reasoning, **chat, "reasoning_content": reasoning}
    return chat


# ---- jinja2 environment, as transformers builds it ---------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` and render its body unchanged.

    transformers uses the tag to build assistant-token masks for training; serving only needs
    templates that contain it to compile.
    """

    tags = {"generation"}  # noqa: RUF012 - jinja2's Extension API declares a class-level set

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed attributes, as transformers' does."""

    # No named `self`, like jinja2's Namespace, so that `namespace(self=...)` still works.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed attribute {name!r} on a namespace"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict`` for templates: construction and ``fromkeys`` only, no type internals."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _jinja_environment() -> ImmutableSandboxedEnvironment:
    """The sandboxed environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once per source; jinja2 templates are safe to share."""
    return _jinja_environment().from_string(source)
