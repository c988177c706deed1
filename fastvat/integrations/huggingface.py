"""Hugging Face ``transformers`` integration: VAT inside ``Trainer.compute_loss``.

::

    from fastvat.integrations.huggingface import VATTrainer

    trainer = VATTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                         vat={"target": "weight"}, vat_weight=1.0,
                         unlabeled_dataset=unlabeled)        # optional: semi-supervised
    trainer.train()

The training loss becomes ``supervised + vat_weight * VAT``. VAT perturbs the model's input
embeddings (``model.get_input_embeddings()``) and reuses the logits of the supervised forward
(no extra clean pass on the labelled batch). With ``unlabeled_dataset`` each step also draws a batch
from it (a cycled, reshuffled loader collated with the trainer's ``data_collator``) and the VAT
term is the batch-mean over the union of both batches. Evaluation losses are supervised only.

``VATMixin`` carries the same ``compute_loss`` for other ``Trainer`` subclasses:
``class MyTrainer(VATMixin, SomeTrainer): ...``.

Under the Trainer's FSDP2 (``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})``) the VAT
passes run on the sharded model itself (docs/integrations.md, "FSDP").

Only this module imports transformers; ``import fastvat`` never does.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

import transformers

import fastvat
from fastvat import _checks
from fastvat._model_io import extract_logits

__all__ = ["VATMixin", "VATTrainer"]


def _unwrap(model):
    """The module under DistributedDataParallel / DataParallel wrappers (their forward may communicate).

    FSDP is left as it is: FSDP2 shards the module in place, and FSDP1's wrapper is what gathers
    the parameters for a forward."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _batch_size(inputs):
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_values"):
        v = inputs.get(key)
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("cannot find a batched tensor in the inputs to size the VAT term")


def _logits_of(outputs, had_labels):
    """The logits of a model output (ModelOutput, dict or tuple), or None when there are none."""
    if outputs is None:
        return None
    try:
        return extract_logits(outputs, tuple_index=1 if had_labels else 0)
    except (TypeError, ValueError):
        return None


if TYPE_CHECKING:
    # A mixin for Trainer subclasses: type-check it as one (at run time it derives from object, so
    # that it can go before any Trainer subclass in the bases).
    _TrainerBase = transformers.Trainer
else:
    _TrainerBase = object


class VATMixin(_TrainerBase):
    """Adds ``vat_weight * VAT`` to a ``transformers.Trainer``'s training loss.

    Keyword arguments (everything else goes to the Trainer):

    vat: ``None`` (default VAT on ``model.get_input_embeddings()``), a dict of ``fastvat.VAT``
        arguments (e.g. ``{"target": "weight", "eps": 1.0}``; ``embedding`` defaults to the input
        embeddings, ``{"target": "input"}`` perturbs the first input instead), or a ready
        ``fastvat.VAT`` built on the same model.
    vat_weight: the weight of the VAT term (``0`` turns it off).
    unlabeled_dataset: optional dataset without labels for the semi-supervised case.
    unlabeled_batch_size: its per-device batch size (default: the training batch size).
    vat_on_labeled: also apply VAT to the labelled batch (default True; needs no extra clean pass).

    The mean VAT term since the last log is logged as ``vat_loss``.

    Raises:
        TypeError: ``vat`` of another type; a non-bool ``vat_on_labeled``.
        ValueError: a negative or non-finite ``vat_weight``, ``unlabeled_batch_size=0``, or
            ``vat_on_labeled=False`` without an ``unlabeled_dataset``.
    """

    def __init__(self, *args: Any, vat: dict[str, Any] | fastvat.VAT | None = None, vat_weight: float = 1.0,
                 unlabeled_dataset: Any = None, unlabeled_batch_size: int | None = None,
                 vat_on_labeled: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if vat is not None and not isinstance(vat, (dict, fastvat.VAT)):
            raise TypeError(f"vat must be None, a dict of fastvat.VAT arguments or a fastvat.VAT, got {type(vat).__name__}")
        self.vat_weight = _checks.finite_number("vat_weight", vat_weight, nonnegative=True)
        if unlabeled_batch_size is not None:
            unlabeled_batch_size = _checks.nonnegative_int("unlabeled_batch_size", unlabeled_batch_size)
            if unlabeled_batch_size == 0:
                raise ValueError("unlabeled_batch_size must be >= 1")
        self.vat_on_labeled = _checks.flag("vat_on_labeled", vat_on_labeled)
        if not self.vat_on_labeled and unlabeled_dataset is None and self.vat_weight > 0:
            raise ValueError("vat_on_labeled=False needs an unlabeled_dataset (otherwise there is nothing to regularize)")
        self.unlabeled_dataset = unlabeled_dataset
        self.unlabeled_batch_size = unlabeled_batch_size
        self._vat_spec = vat
        self._vat = vat if isinstance(vat, fastvat.VAT) else None
        self._unlabeled_iter: Any = None
        self._vat_log_sum: torch.Tensor | None = None
        self._vat_log_count = 0
        self._parent_takes_num_items = "num_items_in_batch" in inspect.signature(super().compute_loss).parameters

    # -- the regularizer -----------------------------------------------------------------------
    def get_vat(self, model: nn.Module) -> fastvat.VAT:
        """The ``fastvat.VAT`` for ``model`` (built on first use, on the module under DDP wrappers).

        Args:
            model: the model the Trainer trains (possibly wrapped in DDP/DataParallel).

        Returns:
            The ``fastvat.VAT`` (the one passed as ``vat=``, or one built from the ``vat`` dict).

        Raises:
            TypeError: the model has no ``get_input_embeddings()`` and ``vat`` names no embedding;
                or a ``fastvat.VAT`` argument error.
        """
        base = _unwrap(model)
        if self._vat is not None and (self._vat.model is base or isinstance(self._vat_spec, fastvat.VAT)):
            return self._vat
        kwargs = dict(self._vat_spec) if isinstance(self._vat_spec, dict) else {}
        if kwargs.get("target") != "input" and "embedding" not in kwargs:
            if not hasattr(base, "get_input_embeddings"):
                raise TypeError("the model has no get_input_embeddings(); pass vat={'embedding': ...}")
            kwargs["embedding"] = base.get_input_embeddings()
        embedding = kwargs.pop("embedding", None)
        self._vat = fastvat.VAT(base, embedding, **kwargs)
        return self._vat

    def get_unlabeled_dataloader(self) -> DataLoader:
        """A shuffled loader over ``unlabeled_dataset``, collated like the training data, prepared by accelerate.

        Returns:
            The prepared ``DataLoader`` (reshuffled each pass from ``args.seed``).
        """
        dataset = self.unlabeled_dataset
        collator = self.data_collator
        try:
            import datasets
        except ImportError:
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="unlabeled")
        elif hasattr(self, "_get_collator_with_removed_columns"):
            collator = self._get_collator_with_removed_columns(collator, description="unlabeled")
        batch_size = self.unlabeled_batch_size or getattr(self, "_train_batch_size", None) \
            or self.args.per_device_train_batch_size
        params: dict[str, Any] = dict(batch_size=batch_size, collate_fn=collator,
                                      num_workers=self.args.dataloader_num_workers,
                                      pin_memory=self.args.dataloader_pin_memory)
        if not isinstance(dataset, IterableDataset):
            gen = torch.Generator()
            gen.manual_seed(int(self.args.seed))
            params.update(sampler=RandomSampler(dataset, generator=gen), drop_last=self.args.dataloader_drop_last)
        return self.accelerator.prepare(DataLoader(dataset, **params))

    def _next_unlabeled(self):
        if self._unlabeled_iter is None:
            self._unlabeled_loader = self.get_unlabeled_dataloader()
            self._unlabeled_iter = iter(self._unlabeled_loader)
        try:
            batch = next(self._unlabeled_iter)
        except StopIteration:  # cycle: a new epoch, reshuffled
            self._unlabeled_iter = iter(self._unlabeled_loader)
            batch = next(self._unlabeled_iter)
        return self._prepare_inputs(batch)

    def compute_vat_loss(self, model: nn.Module, inputs: dict[str, Any],
                         logits: torch.Tensor | None = None) -> torch.Tensor:
        """The VAT term for one step: batch-mean over the labelled and (optional) unlabelled batch.

        Args:
            model: the model the Trainer trains.
            inputs: the labelled batch, as the Trainer passes it to the model.
            logits: the supervised forward's logits for ``inputs`` (saves VAT's clean pass).

        Returns:
            The VAT term, a 0-dim tensor.

        Raises:
            ValueError: no batched tensor in a batch; as ``fastvat.VAT.__call__``.
        """
        vat = self.get_vat(model)
        total: Any = None
        count = 0
        if self.vat_on_labeled:
            n = _batch_size(inputs)
            if vat.head is not None:
                logits = None  # a fused head takes the hidden states from its own clean pass
            # labels are stripped by fastvat (drop_labels=True); with head= they mark the trained positions
            term = vat(**inputs, logits=logits) * n
            total, count = term, n
        if self.unlabeled_dataset is not None:
            batch = self._next_unlabeled()
            n = _batch_size(batch)
            term = vat(**batch) * n
            total, count = (term if total is None else total + term), count + n
        return total / max(count, 1)

    # -- Trainer hooks -------------------------------------------------------------------------
    def _loss_scaled_for_ga(self, num_items_in_batch):
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is None:
            flag = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) \
                or getattr(self, "compute_loss_func", None) is not None
        return bool(flag)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        """The Trainer's loss plus ``vat_weight`` times the VAT term, in training with gradients on.

        Args:
            model, inputs, return_outputs, num_items_in_batch, **kwargs: as ``transformers.Trainer.compute_loss``.

        Returns:
            The loss, or ``(loss, outputs)`` with ``return_outputs``.

        Raises:
            As the parent's ``compute_loss`` and ``compute_vat_loss``.
        """
        if self._parent_takes_num_items:
            kwargs["num_items_in_batch"] = num_items_in_batch
        active = self.vat_weight > 0 and model.training and torch.is_grad_enabled()
        if not active:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        vat_inputs = dict(inputs)  # the parent may pop "labels" from inputs
        had_labels = "labels" in inputs
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        vat_loss = self.compute_vat_loss(model, vat_inputs, _logits_of(outputs, had_labels))
        detached = vat_loss.detach()
        self._vat_log_sum = detached if self._vat_log_sum is None else self._vat_log_sum + detached
        self._vat_log_count += 1
        if self._loss_scaled_for_ga(num_items_in_batch):
            # The supervised loss is already normalised over the accumulated batch; the VAT term is a
            # per-micro-batch mean, so it takes the division the Trainer will not do.
            steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
            vat_loss = vat_loss / steps
        loss = loss + self.vat_weight * vat_loss.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``log``, with the mean VAT term since the last log added as ``vat_loss``.

        Args:
            logs, *args, **kwargs: as ``transformers.Trainer.log``.

        Returns:
            What the parent's ``log`` returns.
        """
        if self._vat_log_count and "loss" in logs:
            logs["vat_loss"] = round(float(cast(torch.Tensor, self._vat_log_sum)) / self._vat_log_count, 6)
            self._vat_log_sum, self._vat_log_count = None, 0
        return super().log(logs, *args, **kwargs)


class VATTrainer(VATMixin, transformers.Trainer):
    """``transformers.Trainer`` with ``vat_weight * VAT`` added to the training loss (see ``VATMixin``)."""
