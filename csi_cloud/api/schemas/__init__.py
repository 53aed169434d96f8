"""Request and response bodies of the HTTP API, one module per resource."""

from __future__ import annotations

from .aps import (
    APOut,
    CSIOut,
    CtlAccepted,
    EmptyRoomIn,
    MotionThresholdFitIn,
    MotionThresholdIn,
    MotionThresholdOut,
    RateIn,
)
from .common import Page
from .dead_letters import DeadLetterOut
from .events import EventOut
from .health import Health
from .identities import EnrollIn, IdentitiesOut
from .labels import LabelIn, LabelOut
from .models import Activated, ModelOut
from .predict import (
    MAX_PAYLOADS,
    PayloadsIn,
    PredictOut,
    RecordingInfo,
    RejectedPayload,
    upload_form_schema,
)
from .predictions import PredictionOut
from .training import JobRequest, JobState, StreamRange, TrainingJobOut

__all__ = ["MAX_PAYLOADS", "APOut", "Activated", "CSIOut", "CtlAccepted", "DeadLetterOut",
           "EmptyRoomIn", "EnrollIn", "EventOut", "Health", "IdentitiesOut", "JobRequest",
           "JobState", "LabelIn", "LabelOut", "ModelOut", "MotionThresholdFitIn",
           "MotionThresholdIn", "MotionThresholdOut", "Page", "PayloadsIn", "PredictOut",
           "PredictionOut", "RateIn", "RecordingInfo", "RejectedPayload", "StreamRange",
           "TrainingJobOut", "upload_form_schema"]
