"""The engine's types <-> the wire contract (the engine itself knows no wire format)."""

from __future__ import annotations

from prompts.tokenizer import Tokenizer
from proto import inference_pb2 as pb
from proto.prompt_ids import prompt_ids_from
from worker.engine.outputs import Delta
from worker.engine.request import GenerateRequest, Priority, SamplingParams

_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}


def fingerprint_of(engine: object) -> str:
    """The fingerprint an engine takes router-made token ids with ("": none, as vLLM's,
    which tokenizes with its own tokenizer)."""
    return getattr(engine, "prompt_fingerprint", "")


def to_engine_request(
    req: pb.GenerateRequest, engine_request_id: str, fingerprint: str = ""
) -> GenerateRequest:
    """`fingerprint` is the engine's tokenizer's: a router's `prompt_ids` made with the same
    tokenizer are taken; others (or none given) leave the engine to tokenize."""
    sp = req.sampling
    sampling = SamplingParams(
        temperature=sp.temperature if sp.HasField("temperature") else 1.0,
        top_p=sp.top_p if sp.HasField("top_p") else 1.0,
        top_k=sp.top_k if sp.HasField("top_k") else 0,
        seed=sp.seed if sp.HasField("seed") else None,
        max_tokens=sp.max_tokens if sp.HasField("max_tokens") else None,
        stop=list(sp.stop),
        stop_token_ids=list(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        include_stop_str_in_output=sp.include_stop_str_in_output,
        logprobs=sp.logprobs if sp.HasField("logprobs") else None,
        skip_special_tokens=sp.skip_special_tokens if sp.HasField("skip_special_tokens") else True,
    )
    out = GenerateRequest(
        request_id=engine_request_id,
        sampling=sampling,
        priority=Priority.BATCH if req.priority == pb.PRIORITY_BATCH else Priority.INTERACTIVE,
        cache_salt=req.cache_salt,
    )
    which = req.WhichOneof("prompt")
    if which == "text":
        out.prompt = req.text
    elif which == "token_ids":
        out.prompt_token_ids = list(req.token_ids.ids)
    elif which == "chat":
        out.messages = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        out.add_generation_prompt = req.chat.add_generation_prompt
    if fingerprint and which != "token_ids" and req.prompt_ids.tokenizer == fingerprint:
        ids = prompt_ids_from(req.prompt_ids.ids)
        if ids is not None and len(ids) <= _most_tokens(req):
            out.pretokenized = ids
    return out


def _most_tokens(req: pb.GenerateRequest) -> int:
    """More ids than a prompt's bytes (every token spells at least one), plus a template's
    own text, are not its ids: a sender that could pass off a long prompt as a short text
    (admission counts text) gets the text tokenized instead."""
    if req.WhichOneof("prompt") == "text":
        return len(req.text.encode()) + 8
    messages = req.chat.messages
    return sum(len(m.content.encode()) + len(m.role) + 32 for m in messages) + 256


def to_response(
    delta: Delta, request_id: str, include_usage: bool, tokenizer: Tokenizer | None
) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(
        request_id=request_id, text=delta.text, token_ids=delta.token_ids, error=delta.error or ""
    )
    if delta.finish_reason:
        resp.finish_reason = _FINISH[delta.finish_reason]
    if delta.stop_reason is not None:
        resp.stop_reason = str(delta.stop_reason)
    if delta.usage is not None and include_usage:
        resp.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=delta.usage.prompt_tokens,
                completion_tokens=delta.usage.completion_tokens,
                cached_prompt_tokens=delta.usage.cached_prompt_tokens,
            )
        )
    if delta.logprobs:

        def tok(t: int) -> str:
            return tokenizer.decode([t], skip_special_tokens=False) if tokenizer else ""

        for lp in delta.logprobs:
            resp.logprobs.add(
                token_id=lp.token_id,
                logprob=lp.logprob,
                token=tok(lp.token_id),
                top=[pb.TopLogprob(token_id=t, logprob=v, token=tok(t)) for t, v in lp.top],
            )
    return resp
