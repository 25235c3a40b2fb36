"""The scheduler that gives a pruned request's tail blocks back to the pool: after the prefill
step that pruned it, the request becomes its L kept prompt tokens (the worker, ``worker.py``,
did the same to its copy in that step)."""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from .worker import PRUNED_ATTRIBUTE, _cdiv


class GlimpsePruneScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pruned_requests: set[str] = set()

    def _preempt_request(self, request, *args, **kwargs):
        # Recomputing a shrunk request would run its kept image positions as text (its image
        # inputs are gone): refuse rather than answer wrongly.
        if request.request_id in self.pruned_requests:
            raise RuntimeError(
                f"glimpse_ops.vllm: request {request.request_id} was pruned and cannot be preempted by recompute; "
                "give the engine more KV cache (or fewer concurrent requests, max_num_seqs)"
            )
        return super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request, *args, **kwargs):
        self.pruned_requests.discard(request.request_id)
        return super()._free_request(request, *args, **kwargs)

    def update_from_output(self, scheduler_output, model_runner_output):
        pruned = getattr(model_runner_output, PRUNED_ATTRIBUTE, None) or {}
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id, kept_ids in pruned.items():
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue  # finished on its first token: its blocks are already free
            self._shrink(request, list(kept_ids))
        return outputs

    def _shrink(self, request, kept_ids: list[int]) -> None:
        S, L = request.num_prompt_tokens, len(kept_ids)
        if L >= S:
            return
        self.pruned_requests.add(request.request_id)
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
