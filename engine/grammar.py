"""Constrained decoding with xgrammar: compile a request's `Constraint` once, mask each step's
logits to the tokens its grammar allows, and advance the grammar with every token it yields.

- `GrammarBackend` (one per engine): xgrammar's `TokenizerInfo` from the engine's tokenizer and
  the model's vocabulary size (logit ids the tokenizer lacks, a padded lm_head's, are never
  allowed). Compiles run on the backend's own thread pool (xgrammar releases the GIL while it
  compiles), so a slow compile never holds up the step loop; compiled grammars, and compile
  errors, are cached by `(kind, spec)`.
- `GrammarState`: one request's matcher. It is built with the tokens the request has already
  generated elsewhere (a migrated request's), and accepts every token the request yields.
- `TokenMask`: one step's bitmask rows for the constrained requests of a batch, on the logits'
  device, applied there in place (xgrammar's CPU kernel on the CPU, its Triton kernel on CUDA).

xgrammar is imported on first use: a worker that never sees a constraint does not load it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from engine.sampling import Constraint

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# What each kind is called in an error message.
_WHAT = {
    "json_schema": "JSON schema",
    "json_object": "JSON object grammar",
    "regex": "regex",
    "ebnf": "EBNF grammar",
    "structural_tag": "structural tag",
}
# xgrammar's C++ errors start with a time stamp, a source location and the failed check.
_NOISE = re.compile(r"\[[\d:]+\] \S+:\d+: |Check failed: \(.*?\) is false: ")
_MAX_ERROR_CHARS = 400


# Keywords whose values are data, not schemas.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def bounded_strings_as_patterns(schema: Any) -> Any:
    """`schema` with every length-bounded string (`minLength`/`maxLength`, no `pattern`)
    rewritten as the equivalent `pattern` `^.{min,max}$`. xgrammar 0.2.9 lowers length bounds
    to a character class that admits raw control characters, which JSON forbids in strings
    (mlc-ai/xgrammar#800); its pattern path does not. The outputs the rewrite allows are valid
    under the original schema."""
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: v if k in _DATA_KEYWORDS else bounded_strings_as_patterns(v) for k, v in schema.items()
    }
    types = out.get("type")
    is_string = types == "string" or (isinstance(types, list) and "string" in types)
    lo, hi = out.get("minLength"), out.get("maxLength")
    bounds_ok = all(isinstance(b, int) and b >= 0 for b in (lo, hi) if b is not None)
    if is_string and (lo is not None or hi is not None) and "pattern" not in out and bounds_ok:
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = f"^.{{{lo or 0},{'' if hi is None else hi}}}$"
    return out


def _rewritten_json(spec: str, rewrite: Callable[[Any], Any]) -> str:
    """`spec` with `rewrite` applied to its JSON; as it is when it is not JSON (xgrammar then
    says what is wrong with it)."""
    try:
        value = json.loads(spec)
    except ValueError:
        return spec
    return json.dumps(rewrite(value))


def _tight_json_elements(fmt: Any) -> Any:
    """A structural tag's format with each JSON-schema element (JSON style) replaced by the
    schema's grammar without free whitespace, as `json_schema` constraints compile: xgrammar's
    element admits any whitespace between tokens, which a weak model fills until its budget
    ends (a forced tool call then never closes)."""
    if isinstance(fmt, list):
        return [_tight_json_elements(v) for v in fmt]
    if not isinstance(fmt, dict):
        return fmt
    if (
        fmt.get("type") == "json_schema"
        and fmt.get("style", "json") == "json"
        and not fmt.get("any_order", False)
        and isinstance(fmt.get("json_schema"), (dict, bool))
    ):
        import xgrammar as xgr

        schema = json.dumps(bounded_strings_as_patterns(fmt["json_schema"]))
        grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
        return {"type": "grammar", "grammar": str(grammar)}
    return {k: _tight_json_elements(v) for k, v in fmt.items()}


def _error_text(exc: BaseException) -> str:
    text = " ".join(_NOISE.sub("", str(exc)).split())
    return text[:_MAX_ERROR_CHARS] or type(exc).__name__


class GrammarState:
    """One request's grammar matcher: which tokens may come next, and whether it has ended."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.rejected = False  # a token the grammar refused was accepted anyway (a bug)

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False (and `rejected` set) if the grammar refuses it."""
        ok = bool(self.matcher.accept_token(token_id))
        if not ok:
            self.rejected = True
        return ok

    @property
    def is_terminated(self) -> bool:
        """The grammar has ended: it accepted a stop token where it could end."""
        return bool(self.matcher.is_terminated())


class TokenMask:
    """A step's grammar mask: bitmask rows `[B, ceil(V / 32)]` (int32) on the logits' device,
    applied to rows `rows` of the logits only."""

    def __init__(self, bitmask: torch.Tensor, rows: list[int], vocab_size: int) -> None:
        self.bitmask = bitmask
        self.rows = rows
        self.vocab_size = vocab_size

    def apply(self, logits: torch.Tensor) -> None:
        """Set the logits of every token the grammar forbids to -inf, in place (`[B, V]`)."""
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(
            logits, self.bitmask, vocab_size=self.vocab_size, indices=self.rows
        )


class GrammarBackend:
    """Compiles constraints for one model's vocabulary and masks its logits. Thread-safe:
    `compile` may be called from any thread (the serving event loop prepares requests there);
    `state` and `token_mask` from the engine's thread."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        device: torch.device,
        compile_threads: int = 2,
        cache_size: int = 512,
    ) -> None:
        if compile_threads < 1 or cache_size < 1:
            raise ValueError(
                f"compile_threads and cache_size must be >= 1, got {compile_threads}, {cache_size}"
            )
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width: the model's, maybe past the tokenizer's
        self.stop_token_ids = sorted(t for t in set(stop_token_ids) if 0 <= t < vocab_size)
        self.device = device
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(compile_threads, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[Constraint, Future[Any]] = OrderedDict()
        self._compiler: Any = None
        self._compiler_lock = threading.Lock()
        self._host: torch.Tensor | None = None  # bitmask rows filled on the host
        self._copied: torch.cuda.Event | None = None  # the host rows' last copy has ended
        self._batch_matcher: Any = None

    # -- compiling --------------------------------------------------------------------------

    def compile(self, constraint: Constraint) -> Future[Any]:
        """The compiled grammar of `constraint`, as a future (cached: the same constraint
        returns the same future). Its result raises ValueError naming the problem when the
        spec does not compile."""
        with self._lock:
            future = self._cache.get(constraint)
            if future is not None:
                self._cache.move_to_end(constraint)
                return future
            future = self._pool.submit(self._compile, constraint)
            self._cache[constraint] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def _compile(self, c: Constraint) -> Any:
        compiler = self._compiler_or_build()
        try:
            if c.kind == "json_schema":
                # No free whitespace: a model (a weak one above all) could otherwise fill its
                # whole budget with spaces. Strict: no properties or items the schema lacks.
                return compiler.compile_json_schema(
                    _rewritten_json(c.spec, bounded_strings_as_patterns),
                    any_whitespace=False,
                    strict_mode=True,
                )
            if c.kind == "json_object":
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            if c.kind == "regex":
                return compiler.compile_regex(c.spec)
            if c.kind == "ebnf":
                return compiler.compile_grammar(c.spec)
            return compiler.compile_structural_tag(_rewritten_json(c.spec, _tight_json_elements))
        except Exception as exc:  # xgrammar raises RuntimeError and its own error types
            raise ValueError(f"the {_WHAT[c.kind]} does not compile: {_error_text(exc)}") from None

    def warm_up(self) -> Future[Any]:
        """Build xgrammar's view of the vocabulary now, on the compile threads, so that the
        first constrained request does not wait for it (seconds for a 150k vocabulary);
        returns the compiler's future (its exception if xgrammar cannot load)."""
        return self._pool.submit(self._compiler_or_build)

    def _compiler_or_build(self) -> Any:
        """xgrammar's compiler for this vocabulary, built by the first compile (in the pool:
        reading a large vocabulary takes a while)."""
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                self._compiler = xgr.GrammarCompiler(self.tokenizer_info(), max_threads=1)
            return self._compiler

    def tokenizer_info(self) -> Any:
        """xgrammar's view of the vocabulary: one entry per logit, "" past the tokenizer's
        vocabulary (xgrammar never allows those), the vocabulary's kind read from
        tokenizer.json as xgrammar's own Hugging Face loader does."""
        import xgrammar as xgr

        encoded = [""] * self.vocab_size
        for token, token_id in self.tokenizer.vocab().items():
            if 0 <= token_id < self.vocab_size:
                encoded[token_id] = token
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(self.tokenizer.backend_json())
        return xgr.TokenizerInfo(
            encoded,
            meta["vocab_type"],
            vocab_size=self.vocab_size,
            stop_token_ids=self.stop_token_ids or None,
            add_prefix_space=meta["add_prefix_space"],
        )

    # -- matching ---------------------------------------------------------------------------

    def state(self, constraint: Constraint, generated: Sequence[int] = ()) -> GrammarState:
        """A fresh matcher for `constraint` that has accepted `generated` (output tokens an
        earlier attempt of the request produced). Waits for the compile if it is still running
        (callers on an event loop await `compile` first). Raises ValueError if the grammar does
        not compile or refuses one of `generated`."""
        import xgrammar as xgr

        state = GrammarState(xgr.GrammarMatcher(self.compile(constraint).result()))
        for i, token in enumerate(generated):
            if not state.accept(token):
                raise ValueError(
                    f"generated token {i} (id {token}) does not match the request's "
                    f"{_WHAT[constraint.kind]}"
                )
        return state

    def token_mask(self, states: Sequence[GrammarState | None]) -> TokenMask | None:
        """The mask of a batch whose row `i` is constrained by `states[i]` (None: not
        constrained); None when no row is. Fills the rows on the host (xgrammar's batch matcher
        spreads several over threads), then starts their copy to the device."""
        rows = [i for i, s in enumerate(states) if s is not None]
        if not rows:
            return None
        import xgrammar as xgr

        host = self._host_rows(len(states))
        matchers = [s.matcher for s in states if s is not None]
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(host, rows[0])
        else:
            if self._batch_matcher is None:
                self._batch_matcher = xgr.BatchGrammarMatcher()
            self._batch_matcher.batch_fill_next_token_bitmask(matchers, host, rows)
        bitmask = host[: len(states)]
        if self.device.type != "cpu":
            bitmask = bitmask.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                self._copied = torch.cuda.Event()
                self._copied.record()
        return TokenMask(bitmask, rows, self.vocab_size)

    def _host_rows(self, batch: int) -> torch.Tensor:
        """The host bitmask, at least `batch` rows, once its previous copy to the device has
        ended (the rows are rewritten in place)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        if self._host is None or self._host.shape[0] < batch:
            rows = max(batch, 2 * self._host.shape[0] if self._host is not None else 8)
            width = -(-self.vocab_size // 32)
            pin = self.device.type == "cuda"
            self._host = torch.empty((rows, width), dtype=torch.int32, pin_memory=pin)
        return self._host

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
