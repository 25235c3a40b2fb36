"""The scheduler that gives a pruned request's tail blocks back to the pool: after the prefill
step that pruned it, the request becomes its L kept prompt tokens (the worker, ``worker.py``,
did the same to its copy in that step). A pruned request that vLLM preempts is recomputed:
its original prompt and images come back, its prompt is prefilled and pruned again with the
same decision, and its generated tokens follow in the next step over the kept cache."""

from __future__ import annotations

from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from .worker import PRUNED_ATTRIBUTE, UNPRUNED_ATTRIBUTE, _cdiv

logger = init_logger(__name__)
# RequestOutput.kv_transfer_params[REPORT_KEY] of a pruned request: prompt_tokens, kept_prompt_tokens,
# visual_tokens, kept_visual_tokens (the response's kv_transfer_params in `vllm serve`)
REPORT_KEY = "glimpse"


@dataclass(frozen=True)
class _Original:
    """What a pruned request was before its prune: what recomputing it needs."""

    prompt_token_ids: list[int]
    mm_features: list


class GlimpsePruneScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pruned_requests: dict[str, _Original] = {}  # by request id, while the request holds a pruned cache
        self.recomputing: set[str] = set()  # preempted after a prune: the next prefill holds the prompt only
        self.prune_reports: dict[str, dict[str, int]] = {}  # by request id, until the request is freed
        self.sessions: set[str] = set()  # streaming-input sessions: served unpruned
        self.warned_of_sessions = False
        self.image_token_id = self.vllm_config.model_config.hf_config.image_token_id

    def _preempt_request(self, request, *args, **kwargs):
        """vLLM's preemption; a pruned request gets its original prompt and images back, so
        that vLLM's recompute prefills what the prune saw (``schedule`` limits that prefill to
        the prompt; the worker prunes it with the decision it made the first time)."""
        result = super()._preempt_request(request, *args, **kwargs)
        original = self.pruned_requests.pop(request.request_id, None)
        if original is not None:
            L, S = request.num_prompt_tokens, len(original.prompt_token_ids)
            logger.warning("glimpse_ops.vllm: request %s was pruned (%d of %d prompt tokens kept) and preempted; "
                           "it will be recomputed", request.request_id, L, S)  # fmt: skip
            request._all_token_ids[:L] = original.prompt_token_ids  # in place: the read-only view stays valid
            request.prompt_token_ids = list(original.prompt_token_ids)
            request.num_prompt_tokens = S
            request.mm_features = list(original.mm_features)
            self.recomputing.add(request.request_id)
        return result

    def add_request(self, request) -> None:
        """vLLM's add; a streaming-input session (``resumable``, ``AsyncLLM.generate`` with an
        input stream) is served unpruned: vLLM appends each later input to the session's
        prompt and would place it after a shrunk prompt whose images are gone."""
        if request.resumable and request.request_id not in self.requests:
            if not self.warned_of_sessions:
                self.warned_of_sessions = True
                logger.warning("glimpse_ops.vllm: streaming-input sessions are served without pruning "
                               "(request %s)", request.request_id)  # fmt: skip
            self.sessions.add(request.request_id)
        super().add_request(request)

    def schedule(self, *args, **kwargs):
        """vLLM's schedule, where a recomputed pruned request's prefill holds its prompt only:
        its generated tokens must attend to the kept tokens at every layer, as they did
        before the preemption, so they run in the steps after the prune. During the call
        such a request shows vLLM its prompt only."""
        hidden: dict[str, list[int]] = {}
        for req_id in self.recomputing:
            request = self.requests.get(req_id)
            if request is not None and request.num_computed_tokens == 0:
                hidden[req_id] = request._all_token_ids[request.num_prompt_tokens :]
                del request._all_token_ids[request.num_prompt_tokens :]
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            for req_id, tokens in hidden.items():
                self.requests[req_id]._all_token_ids.extend(tokens)
        for req_id in hidden:
            request = self.requests[req_id]
            if req_id in output.num_scheduled_tokens and request.num_computed_tokens < request.num_tokens:
                request.is_prefill_chunk = True  # vLLM judged it by the prompt alone
                self._inflight_prefills.add(request)
        setattr(output, UNPRUNED_ATTRIBUTE, frozenset(self.sessions & output.num_scheduled_tokens.keys()))
        return output

    def _free_request(self, request, *args, **kwargs):
        """vLLM's free; the request's output then carries what the prune kept, in
        ``kv_transfer_params["glimpse"]`` (the one per-request dict vLLM already carries from
        the scheduler to ``RequestOutput`` and to the OpenAI server's response)."""
        self.pruned_requests.pop(request.request_id, None)
        self.recomputing.discard(request.request_id)
        self.sessions.discard(request.request_id)
        report = self.prune_reports.pop(request.request_id, None)
        result = super()._free_request(request, *args, **kwargs)
        if report is None:
            return result
        kv_params, *rest = result
        return ({**(kv_params or {}), REPORT_KEY: report}, *rest)

    def update_from_output(self, scheduler_output, model_runner_output):
        pruned = getattr(model_runner_output, PRUNED_ATTRIBUTE, None) or {}
        for req_id, kept_ids in pruned.items():  # before vLLM frees a request that ends on its first token
            if (request := self.requests.get(req_id)) is not None:
                self.prune_reports[req_id] = self._report(request, len(kept_ids))
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id, kept_ids in pruned.items():
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue  # finished on its first token: its blocks are already free
            self._shrink(request, list(kept_ids))
        return outputs

    def _report(self, request, kept: int) -> dict[str, int]:
        S = request.num_prompt_tokens
        visual = sum(1 for token in request.prompt_token_ids if token == self.image_token_id)
        return {"prompt_tokens": S, "kept_prompt_tokens": kept, "visual_tokens": visual,
                "kept_visual_tokens": visual - (S - kept)}  # fmt: skip

    def _shrink(self, request, kept_ids: list[int]) -> None:
        S, L = request.num_prompt_tokens, len(kept_ids)
        self.recomputing.discard(request.request_id)
        if L >= S:
            return
        self.pruned_requests[request.request_id] = _Original(list(request.prompt_token_ids), list(request.mm_features))
        self.encoder_cache_manager.free(request)  # before mm_features go: it indexes them
        request.mm_features = []  # else the encoder would be scheduled again at decode positions
        request._all_token_ids[:S] = kept_ids  # in place: the request's read-only view stays valid
        request.prompt_token_ids = kept_ids
        request.num_prompt_tokens = L
        request.num_computed_tokens -= S - L
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            blocks = manager.req_to_blocks.get(request.request_id)
            if not blocks:
                continue
            keep = _cdiv(L, manager.block_size)
            tail = blocks[keep:]
            del blocks[keep:]
            manager.block_pool.free_blocks(reversed(tail))
