"""Instruction data: files -> normalised conversations -> masked token examples -> packed, resumable batches."""

from jaxtune.data.chat import BUILTIN_TEMPLATES, builtin_template, render_with_spans, resolve_template
from jaxtune.data.config import DataConfig
from jaxtune.data.formats import Conversation, load_records
from jaxtune.data.loader import Loader, make_loader, pad_id_for
from jaxtune.data.packing import BATCH_KEYS, pack_examples
from jaxtune.data.prepare import prepare_dataset
from jaxtune.data.report import RecordError, Report
from jaxtune.data.tokenize import fit_length, shift, tokenize_conversation

__all__ = [
    "BATCH_KEYS", "BUILTIN_TEMPLATES", "Conversation", "DataConfig", "Loader", "RecordError", "Report",
    "builtin_template", "fit_length", "load_records", "make_loader", "pack_examples", "pad_id_for",
    "prepare_dataset", "render_with_spans", "resolve_template", "shift", "tokenize_conversation",
]
