"""`FstModelLoader`: vLLM's default loader with fst reading the safetensors files.

Imported only by ``fst.vllm.plugin`` on a vLLM version it supports; vLLM's own code
(``model_executor/model_loader/default_loader.py``) is what this subclass keeps in step with.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Optional

import torch
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight
from vllm.model_executor.model_loader.weight_utils import (
    enable_tqdm,
    filter_mm_encoder_only_safetensors_files,
    filter_safetensors_files_by_weight_name,
)

from . import LOAD_FORMAT, LOGGER_NAME
from .weights import FstOptions, iter_weights, progress_bar, split_extra_config, stats_line

logger = logging.getLogger(LOGGER_NAME)


class FstModelLoader(DefaultModelLoader):
    """``load_format="fst"``: the default loader's file choice, filters and counters, with the
    safetensors read by fst (collectively across vLLM's ranks). Other checkpoints (``.bin``,
    ``.pt``) are the parent's to load."""

    def __init__(self, load_config: Any) -> None:
        # The parent validates model_loader_extra_config against its own keys, and switches
        # on load_format in _prepare_weights (raising on one it does not know): it gets a copy
        # with fst's keys taken out and the format "hf" (safetensors, else .bin / .pt).
        options, rest = split_extra_config(load_config.model_loader_extra_config)
        super().__init__(dataclasses.replace(load_config, load_format="hf", model_loader_extra_config=rest))
        self.fst_options: FstOptions = options
        self.requested_load_config = load_config  # as the user gave it, fst's options included

    def _get_weights_iterator(self, source: DefaultModelLoader.Source):
        hf_folder, files, use_safetensors, index_file = self._prepare_weights(
            source.model_or_path, source.subfolder, source.revision, source.fall_back_to_pt,
            source.allow_patterns_overrides)
        # torchao checkpoints are rebuilt into tensor subclasses by the parent's iterator. The
        # parent prepares the files again (a local folder is listed twice; a download is
        # already in the cache), which keeps its code path unchanged.
        if not use_safetensors or self.load_config.safetensors_load_strategy == "torchao":
            return super()._get_weights_iterator(source)
        # The parent's filters, in its order: shards that only hold the language model under
        # --mm-encoder-only, then shards holding only weights the model does not use.
        if self._encoder_only_lm_prefixes is not None and files:
            files = filter_mm_encoder_only_safetensors_files(
                files, hf_folder, index_file, self._encoder_only_lm_prefixes,
                weights_mapper=self._encoder_only_weights_mapper)
            if not files:
                raise RuntimeError(f"mm-encoder-only shard filter removed all weight files for "
                                   f"`{source.model_or_path}`; check language_model prefixes "
                                   f"{self._encoder_only_lm_prefixes}")
        if source.is_unused_weight is not None:
            files = filter_safetensors_files_by_weight_name(files, source.is_unused_weight)

        # Expert parallelism: this rank's experts only, by name, before any byte is read.
        skip = None
        if self.local_expert_ids is not None:
            skip = functools.partial(should_skip_weight, local_expert_ids=self.local_expert_ids)
        weights = iter_weights(
            files, options=self.fst_options, device=_rank_device(self.load_config), group=_world_group(),
            skip=skip, progress=_progress(self.load_config.use_tqdm_on_load),
            on_done=lambda stats: logger.info("%s", stats_line(stats)))
        # The parent's counter: vLLM reports "Loading weights took ..." from it.
        if self.counter_before_loading_weights == 0.0:
            self.counter_before_loading_weights = time.perf_counter()
        return ((source.prefix + name, tensor) for name, tensor in weights)


def _world_group() -> Optional[Any]:
    """vLLM's world device group when it spans several ranks, else None (a plain load).

    Passed explicitly: vLLM always initialises torch.distributed, so fst's default (the
    default group) would make even a single rank take the distributed path."""
    try:
        from vllm.distributed.parallel_state import get_world_group

        world = get_world_group()
    except (AssertionError, ImportError):
        return None  # outside an engine (no world group): this process loads alone
    return world.device_group if world.world_size > 1 else None


def _rank_device(load_config: Any) -> torch.device:
    """The rank's current CUDA device for a CUDA engine, else the CPU (as the default
    iterator gives): never a device derived from the global rank."""
    device = load_config.device
    if device is None:
        from vllm.config import get_current_vllm_config

        device = get_current_vllm_config().device_config.device
    if torch.device(device).type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _progress(use_tqdm_on_load: bool):
    """One bar, on rank 0 (vLLM's rule for its own bars)."""
    if not enable_tqdm(use_tqdm_on_load):
        return None
    return progress_bar(f"Loading safetensors checkpoint shards ({LOAD_FORMAT})")
