"""Multiple-choice scoring conventions, as lm-evaluation-harness (0.4.x) defines them.

lm-eval scores a multiple-choice item as one ``(context, continuation)`` request per option and
fixes three conventions around the summed log-likelihood, which this module reproduces so that
our ``acc``/``acc_norm`` are its numbers:

- **What is scored.** The continuation is the option's text after the target delimiter: ``""``
  after a chat template's generation prompt (``--apply_chat_template``), else ``" "``. Nothing
  follows the option (no end-of-turn token). This is the ``"lm_eval"`` convention, our default.
- **How the pair is tokenised** (``_encode_pair``): whitespace that ends the context is moved to
  the front of the continuation, the whole string is tokenised and the context's tokens are cut
  off the front. Tokenising the two apart gives token sequences the model never saw
  (``"Answer: "`` + ``"cow"`` instead of ``"Answer:"`` + ``" cow"``), several nats off.
- **acc_norm** divides each option's log-likelihood by the option's length in *characters*
  (``len(choice)``, without the delimiter; ``process_results`` in ``lm_eval/api/task.py``).

The ``"end_of_turn"`` convention scores each option as the assistant's whole reply instead:
option text + the chat template's end-of-turn token. Its reason: under ``"lm_eval"`` an option
that is a prefix of another ("cow" vs "cowboy") wins whenever the model would go on to say the
longer one, since the prefix's probability includes every continuation of it; the end-of-turn
token asks "is this the whole answer". Its prompt is tokenised as for generation and training
(prompt alone, then the reply's tokens: what the model produces after that prompt), so the
prompt's final whitespace is not scored; ``acc_norm`` still divides by the option's characters
(the end-of-turn token counts like lm-eval's delimiter: scored, not measured).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, get_args

from mmcompose.errors import ConfigError, MMComposeError

if TYPE_CHECKING:
    from mmcompose.model.processor import MMProcessor

Continuation = Literal["lm_eval", "end_of_turn"]
CONTINUATIONS: tuple[str, ...] = get_args(Continuation)
DEFAULT_CONTINUATION: Continuation = "lm_eval"
# Result keys ("metric,filter") per scoring mode.
METRICS: dict[str, tuple[str, ...]] = {
    "generate": ("acc,generate",),
    "loglikelihood": ("acc,loglikelihood", "acc_norm,loglikelihood"),
}


def check_continuation(name: str) -> Continuation:
    if name not in CONTINUATIONS:
        raise ConfigError(
            f"unknown continuation {name!r}",
            hint="use lm_eval (lm-evaluation-harness's scoring) or end_of_turn (option + the "
            "chat template's end of turn, so a prefix like 'cow' does not beat 'cowboy')",
        )
    return name  # type: ignore[return-value]


def encode_pair(
    tokenize: Callable[[str], list[int]], context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` for causal models: the context's trailing whitespace moves
    into the continuation, the whole text is tokenised once and split after the context's
    token count."""
    if not context:
        raise ValueError("the context cannot be empty")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenize(context + continuation)
    ctx = tokenize(context)
    return ctx, whole[len(ctx) :]


def target_delimiter(processor: MMProcessor, chat: bool) -> str:
    """lm-eval's delimiter before an option: none after a chat template's generation prompt
    (it sets ``target_delimiter`` to ``""`` under ``apply_chat_template``), else ``" "``."""
    return "" if chat and getattr(processor.tokenizer, "chat_template", None) else " "


def answer_continuations(
    processor: MMProcessor, messages: Sequence[dict[str, str]], answers: Sequence[str]
) -> list[str]:
    """Each answer rendered as the assistant's complete reply after ``messages`` (the text the
    chat template adds after the generation prompt: answer + end of turn, cut after the
    end-of-turn token): the ``"end_of_turn"`` continuations."""
    prompt = processor.render_chat(messages, add_generation_prompt=True)
    out = []
    for a in answers:
        full = processor.render_chat(
            [*messages, {"role": "assistant", "content": a}], add_generation_prompt=False
        )
        if not full.startswith(prompt):
            raise MMComposeError(
                "the chat template does not render the answer after the generation prompt",
                hint="log-likelihood scoring needs a template whose turns render as prefixes",
            )
        cont = full[len(prompt) :]
        # Stop at the end-of-turn token: what the template adds after it ("\n") is the same
        # for every answer, so scoring it changes no ranking and costs a token per option.
        eos = processor.tokenizer.eos_token
        if eos and eos in cont:
            cont = cont[: cont.index(eos) + len(eos)]
        out.append(cont)
    return out


def option_tokens(
    processor: MMProcessor,
    context: str,
    messages: Sequence[dict[str, str]],
    answers: Sequence[str],
    continuation: Continuation = DEFAULT_CONTINUATION,
    chat: bool = True,
) -> tuple[list[int], list[list[int]]]:
    """The context's token ids (shared by every option) and each option's continuation ids.

    ``context`` is the prompt text as rendered for generation (``messages`` with the
    generation prompt); ``chat`` says whether it came from the chat template."""
    if continuation == "end_of_turn":  # the prompt as generation sees it, then each reply
        ctx = processor.tokenize(context)
        pairs = [
            (ctx, processor.tokenize(t, add_special_tokens=False))
            for t in answer_continuations(processor, messages, answers)
        ]
    else:
        delim = target_delimiter(processor, chat)
        pairs = [encode_pair(processor.tokenize, context, f"{delim}{a}") for a in answers]
    empty = [a for a, (_, c) in zip(answers, pairs, strict=True) if not c]
    if empty:
        raise MMComposeError(
            f"option(s) {', '.join(map(repr, empty))} tokenise to nothing after the prompt",
            hint="options must be non-empty text",
        )
    return pairs[0][0], [c for _, c in pairs]


def choose(scores: Sequence[float], options: Sequence[str]) -> tuple[int, int]:
    """lm-eval's predictions: (argmax of the log-likelihoods, argmax of them divided by each
    option's length in characters). Ties go to the first, as ``np.argmax``."""
    if len(scores) != len(options) or not options:
        raise ValueError("one score per option, at least one option")
    norm = [s / max(len(o), 1) for s, o in zip(scores, options, strict=True)]
    return _argmax(scores), _argmax(norm)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
