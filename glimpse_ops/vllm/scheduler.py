"""The scheduler that gives a pruned request's tail blocks back to the pool: after the prefill
step that pruned it, the request becomes its L kept prompt tokens (the worker, ``worker.py``,
did the same to its copy in that step)."""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from .worker import PRUNED_ATTRIBUTE, _cdiv

logger = init_logger(__name__)
# RequestOutput.kv_transfer_params[REPORT_KEY] of a pruned request: prompt_tokens, kept_prompt_tokens,
# visual_tokens, kept_visual_tokens (the response's kv_transfer_params in `vllm serve`)
REPORT_KEY = "glimpse"


class GlimpsePruneScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pruned_requests: set[str] = set()
        self.failed_requests: set[str] = set()  # pruned and preempted: finished with an error next update
        self.prune_reports: dict[str, dict[str, int]] = {}  # by request id, until the request is freed
        self.image_token_id = self.vllm_config.model_config.hf_config.image_token_id

    def _preempt_request(self, request, *args, **kwargs):
        """vLLM's preemption; a pruned request then fails alone, with an error to its client.
        Recomputing it is not possible yet: its image inputs are gone and its kept image
        positions would run as text. vLLM puts a preempted request back in the waiting queue
        and schedules no waiting request in the step that preempted: the next
        ``update_from_output`` finishes it with FINISHED_ERROR (vLLM's per-request error path,
        which sends the client a finish reason of "error") before it can be recomputed."""
        result = super()._preempt_request(request, *args, **kwargs)
        if request.request_id in self.pruned_requests:
            logger.error(
                "glimpse_ops.vllm: request %s was pruned and then preempted (the KV cache is full); it fails with "
                "finish reason 'error' instead of being recomputed: give the engine more KV cache "
                "(gpu_memory_utilization, num_gpu_blocks_override) or fewer concurrent requests (max_num_seqs)",
                request.request_id,
            )
            self.failed_requests.add(request.request_id)
        return result

    def _free_request(self, request, *args, **kwargs):
        """vLLM's free; the request's output then carries what the prune kept, in
        ``kv_transfer_params["glimpse"]`` (the one per-request dict vLLM already carries from
        the scheduler to ``RequestOutput`` and to the OpenAI server's response)."""
        self.pruned_requests.discard(request.request_id)
        report = self.prune_reports.pop(request.request_id, None)
        result = super()._free_request(request, *args, **kwargs)
        if report is None:
            return result
        kv_params, *rest = result
        return ({**(kv_params or {}), REPORT_KEY: report}, *rest)

    def update_from_output(self, scheduler_output, model_runner_output):
        pruned = getattr(model_runner_output, PRUNED_ATTRIBUTE, None) or {}
        # vLLM finishes the ids in this set as per-request errors inside update_from_output
        self.encoder_cache_mismatch_reqs.update(self.failed_requests)
        self.failed_requests.clear()
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
