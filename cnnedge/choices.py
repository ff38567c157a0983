"""Every closed set of choices, once: the CLI's option types (Typer lists them in --help and refuses anything
else in one line) and the tuples the modules check API callers against. Imports nothing heavy."""

from __future__ import annotations

from enum import Enum
from typing import Literal, get_args

Provider = Literal["auto", "cpu", "cuda", "tensorrt"]
Runtime = Literal["onnxruntime", "opencv"]
PredictFormat = Literal["table", "json", "csv"]
WebcamFormat = Literal["live", "json"]
BenchFormat = Literal["table", "json", "markdown"]
InfoFormat = Literal["table", "json"]
Metric = Literal["cosine", "ssd"]
Optimizer = Literal["sgd", "adam", "adamw", "rmsprop"]
Schedule = Literal["onecycle", "cosine", "constant"]
Loss = Literal["cross-entropy", "mse"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Quantization = Literal["none", "fp16", "int8"]
PreprocessMode = Literal["digit", "fit"]
Precision = Literal["fp32", "fp16", "int8"]
SweepSearch = Literal["grid", "tpe"]
SweepKeep = Literal["all", "best"]

PROVIDERS = get_args(Provider)
RUNTIMES = get_args(Runtime)
METRICS = get_args(Metric)
OPTIMIZERS = get_args(Optimizer)
SCHEDULES = get_args(Schedule)
LOSSES = get_args(Loss)
DEVICES = get_args(Device)
QUANTIZATIONS = get_args(Quantization)
PREPROCESS_MODES = get_args(PreprocessMode)
PRECISIONS = get_args(Precision)
SWEEP_SEARCHES = get_args(SweepSearch)
SWEEP_KEEPS = get_args(SweepKeep)

# Typer takes a repeatable option's choices from an Enum only (not a list of Literal).
QuantizeOption = Enum("QuantizeOption", {q: q for q in QUANTIZATIONS}, type=str)
