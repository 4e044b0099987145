"""The `lm_eval` evaluator: EleutherAI's lm-evaluation-harness on a merged language model.

Light module (no torch or lm-eval at import): the work is in ``mk_lm_eval.tasks`` (which tasks,
which split, labels), ``mk_lm_eval.models`` (which model) and ``mk_lm_eval.run`` (the scoring).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mergekit_core import REQUIRED, ConfigError, Evaluator, Param, TaskInfo


class LmEvalEvaluator(Evaluator):
    name = "lm_eval"
    description = ("EleutherAI's lm-evaluation-harness: lm-eval task names or task YAML files; "
                   "each task's primary metric (acc for multiple choice).")
    params = (
        Param("tasks", REQUIRED, "lm-eval task names or task YAML files (a list, or names separated by commas)",
              type=(list, str)),
        Param("include_path", None, "a folder of task YAML files added to lm-eval's registry", type=str),
        Param("base_model", None, "the model folder (config.json, tokenizer) that in-memory merges load into; "
                                  "for a model folder without tokenizer files, its tokenizer", type=str),
        Param("num_fewshot", None, "few-shot examples per prompt (default: the task's own, else 0)",
              type=int, min=0),
        Param("batch_size", 16, "documents per forward pass", type=int, min=1),
        Param("device", None, "torch device (default: cuda when available, else cpu)", type=str),
        Param("dtype", "auto", "dtype the model is scored in (auto: the one in its config.json)", type=str,
              choices=("auto", "float32", "bfloat16", "float16")),
        Param("limit", None, "score only the first N documents of each task (eval_subset draws from them)",
              type=int, min=1),
        Param("verbose", False, "show lm-eval's logs and progress bars", type=bool),
    )

    def _task(self, task: str, params: dict[str, Any]) -> Any:
        from mk_lm_eval.tasks import load_task, task_specs

        for spec in task_specs(params["tasks"]):
            loaded = load_task(*self._key(spec, params))
            if loaded.task.task_name == task:
                return loaded
        raise ConfigError(f"lm_eval: task {task} is not one of evaluator_params.tasks ({params['tasks']})")

    @staticmethod
    def _key(spec: str, params: dict[str, Any]) -> tuple[str, str | None, int | None]:
        from pathlib import Path

        from mk_lm_eval.tasks import is_file

        include = str(Path(params["include_path"]).absolute()) if params.get("include_path") else None
        return (str(Path(spec).expanduser().absolute()) if is_file(spec) else spec), include, params["num_fewshot"]

    def validate(self, params: dict[str, Any]) -> None:
        device = params["device"]
        if device is not None and device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"lm_eval: device {device}, but torch sees no GPU; use device: cpu or leave it "
                                  "out (cuda when available, else cpu)")

    def tasks(self, params: dict[str, Any]) -> list[TaskInfo]:
        """Each named task, loaded (data included) so that a bad name or a missing data file
        stops the command before anything is merged."""
        from mk_lm_eval.tasks import load_task, primary_metric, quiet, task_specs

        out = []
        with quiet(params["verbose"]):
            for spec in task_specs(params["tasks"]):
                task = load_task(*self._key(spec, params)).task
                metric, higher = primary_metric(task)
                out.append(TaskInfo(task.task_name, metric, higher_is_better=higher))
        return out

    def labels(self, task: str, split: str, params: dict[str, Any]) -> list[int]:
        """Class labels of the split's documents (the first ``limit``), for stratified subsets."""
        from mk_lm_eval.tasks import labels, quiet

        with quiet(params["verbose"]):
            loaded = self._task(task, params)
            key = (split, params["limit"])
            if key not in loaded.labels:
                loaded.labels[key] = labels(loaded.select(split), params["limit"])
            return list(loaded.labels[key])

    def evaluate(self, model: Any, task: str, split: str, subset: Sequence[int] | None,
                 params: dict[str, Any]) -> dict[str, float]:
        """lm-eval's metrics of ``model`` (a state dict, a model folder or an adapter folder) on
        ``task``/``split``, on the documents ``subset`` (else the first ``limit``, else all)."""
        from mk_lm_eval.models import language_model
        from mk_lm_eval.run import evaluate, wrap
        from mk_lm_eval.tasks import quiet

        with quiet(params["verbose"]):
            lm_task = self._task(task, params).select(split)
            model_obj, tokenizer = language_model(model, params["base_model"], params["dtype"], params["device"])
            indices = subset
            if indices is None and params["limit"] is not None:
                indices = range(min(params["limit"], len(lm_task.eval_docs)))
            return evaluate(wrap(model_obj, tokenizer, params["batch_size"]), lm_task, indices)
