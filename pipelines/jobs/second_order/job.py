"""`clipscope second-order`: the statistics of one MLP layer's neurons' second-order effects
(`statistics`), then, with a task, zero-shot accuracy under their mean-ablations (`ablation`).

Two reductions, each with its own record: the statistics group `reductions/second_order/layer_{l}`
(settings: layer, top_k, neuron_chunk, chunks_per_block) and its `evaluation` array (settings: layer,
task, its prompts, chunks_per_block and the PCs it starts from). Each is written whole; a rerun with
the same settings on the same extraction reads it back (unless `force`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from clipscope.cluster.executor import Executor
from clipscope.kernels.second_order_ablation import ABLATIONS
from clipscope.pipelines.jobs.second_order.ablation import ablation_accuracy
from clipscope.pipelines.jobs.second_order.result import Result, evaluation_name, read_evaluation, read_statistics
from clipscope.pipelines.jobs.second_order.settings import SecondOrderSettings
from clipscope.pipelines.jobs.second_order.statistics import compute_statistics, layer_arrays, result_prefix
from clipscope.pipelines.texts.zero_shot import classifier, get_task, store_classes
from clipscope.storage.results import begin_reduction, settings_digest
from clipscope.storage.store import RunStore


def run(store: RunStore, settings: SecondOrderSettings, executor: Executor | None = None) -> Result:
    """Norm statistics, top-k rows and rank-1 PCs of every neuron of `settings.layer`, and with
    `settings.task` the accuracy under the ablations of `kernels.second_order_ablation`."""
    layer = settings.layer
    layer_arrays(store, layer)  # a missing layer fails before the lock is taken
    with begin_reduction(store, "second-order", settings.statistics_record(),
                         allow_incomplete=settings.allow_incomplete, force=settings.force) as reduction:
        if reduction.is_current(result_prefix(layer)):
            result = Result(settings, *read_statistics(store, layer))
        else:
            result = Result(settings, *compute_statistics(store, settings, executor))
            result.write(reduction)
    if settings.task is None:
        return result
    return _evaluate(store, result, executor)


def _evaluate(store: RunStore, result: Result, executor: Executor | None) -> Result:
    settings = result.settings
    task = get_task(settings.task)
    record = {"layer": settings.layer, "task": task.name, "prompts": settings_digest(task.prompts),
              "chunks_per_block": settings.chunks_per_block}
    if f"{result_prefix(settings.layer)}/pc" in store.array_names():
        record["pc"] = settings_digest(store.read_result(f"{result_prefix(settings.layer)}/pc"))
    with begin_reduction(store, "second-order evaluation", record, allow_incomplete=settings.allow_incomplete,
                         force=settings.force) as reduction:
        if reduction.is_current_array(evaluation_name(settings.layer)):
            evaluation, labelled = read_evaluation(store, settings)
            return dataclasses.replace(result, evaluation=evaluation, labelled=labelled)
        classes = store_classes(store, task)
        table = ablation_accuracy(store, settings, classifier(store, task), classes, executor)
        result = dataclasses.replace(result, evaluation=np.array([table[a] for a in ABLATIONS]),
                                     labelled=table["labelled"])
        if store.mode == "r+":
            result.write_evaluation(reduction)
    return result
