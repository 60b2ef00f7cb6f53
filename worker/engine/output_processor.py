"""Per-request detokenisation and stop conditions.

Stop strings may span tokens, so while streaming the tail of the text that could still
become a stop string is held back until it either completes one (and is cut) or cannot.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from prompts.tokenizer import Tokenizer
from worker.engine.outputs import Delta, FinishReason, TokenLogprob
from worker.engine.request import Request


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string.

    Only prefixes ending in the text's last character can match, so those are the only
    lengths tried (found by str.rfind): trying every length cost ~113 us a token for four
    256-character stop strings, on the engine thread every request's step waits for."""
    if not text:
        return 0
    last = text[-1]
    best = 0
    for stop in stops:
        # i: the index of a candidate prefix's last character (its length is i + 1)
        i = stop.rfind(last, 0, min(len(stop) - 1, len(text)))
        while i >= best:
            if text.endswith(stop[: i + 1]):
                best = i + 1
                break
            i = stop.rfind(last, 0, i)
    return best


class OutputProcessor:
    def __init__(self, request: Request, tokenizer: Tokenizer) -> None:
        self.request = request
        self.tokenizer = tokenizer
        sp = request.sampling
        self.stream = tokenizer.decode_stream(request.prompt_token_ids, sp.skip_special_tokens)
        self.text = ""
        self.emitted = 0
        self.stops = sp.stop
        self.max_stop_len = max((len(s) for s in sp.stop), default=0)
        self.stop_token_ids = set(sp.stop_token_ids)
        if not sp.ignore_eos:
            self.stop_token_ids |= request.eos_token_ids

    def process(
        self, token_id: int, logprob: tuple[float, list[tuple[int, float]]] | None
    ) -> Delta:
        """Account one sampled token; the returned delta's finish_reason ends the request."""
        req = self.request
        delta = Delta(req.request_id, token_ids=[token_id])
        if logprob is not None:
            delta.logprobs = [TokenLogprob(token_id, logprob[0], logprob[1])]
        finish: FinishReason | None = None
        # The length comes first, as in vLLM: a stop token sampled as the last one allowed
        # ends the answer as "length", and is decoded as any other token.
        at_length = req.num_output_tokens >= req.max_tokens
        if token_id in self.stop_token_ids and not at_length:
            finish = "stop"
            delta.stop_reason = None if token_id in req.eos_token_ids else token_id
        else:
            try:
                piece = self.stream.step(self.tokenizer.hf, token_id)
            except Exception as e:  # as vLLM: a decoder whose state broke starts again
                if "Invalid prefix" not in str(e):
                    raise
                self.stream = DecodeStream(skip_special_tokens=req.sampling.skip_special_tokens)
                piece = self.stream.step(self.tokenizer.hf, token_id)
            if piece:
                start = max(0, len(self.text) - self.max_stop_len + 1)
                self.text += piece
                if self.stops:
                    finish = self._check_stop_strings(start, delta)
        if finish is None and at_length:
            finish = "length"
        delta.finish_reason = finish
        end = len(self.text) if finish else len(self.text) - _holdback(self.text, self.stops)
        if end > self.emitted:
            delta.text = self.text[self.emitted : end]
            self.emitted = end
        return delta

    def _check_stop_strings(self, search_from: int, delta: Delta) -> FinishReason | None:
        hit: tuple[int, str] | None = None
        for stop in self.stops:
            i = self.text.find(stop, search_from)
            if i >= 0 and (hit is None or i < hit[0]):
                hit = (i, stop)
        if hit is None:
            return None
        i, stop = hit
        keep = i + len(stop) if self.request.sampling.include_stop_str_in_output else i
        self.text = self.text[:keep]
        self.emitted = min(self.emitted, keep)
        delta.stop_reason = stop
        return "stop"
