"""Model bundles: list, details, edge weights for rollout, activation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status

from csi_edge.bundle import BundleManifest
from csi_edge.rollout import edge_archive

from ...model.bundle import activation_refusal
from ...registry import UnknownModelError
from ...service import NotConnectedError
from ..deps import CloudDep, WriteAccess
from ..schemas import Activated, ModelOut, Page

router = APIRouter(prefix="/models", tags=["models"])


def model_out(manifest: BundleManifest, active: str) -> ModelOut:
    return ModelOut(id=manifest.id, name=manifest.name, created=manifest.created,
                    active=manifest.id == active,
                    input_spec=manifest.input_spec.model_dump(mode="json"),
                    levels=[lv.model_dump() for lv in manifest.levels], labels=manifest.labels,
                    metrics=manifest.metrics, training=manifest.training,
                    edge_id=manifest.wire_id, parent=manifest.parent)


def _find(cloud: CloudDep, model_id: str) -> BundleManifest:
    try:
        return cloud.model(model_id).manifest
    except UnknownModelError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {model_id!r}") from None


@router.get("", response_model=Page[ModelOut], summary="Every bundle this service serves")
def list_models(cloud: CloudDep) -> Page[ModelOut]:
    manifests = cloud.manifests(refresh=True)
    active = cloud.active_model
    data = [model_out(m, active) for m in manifests]
    return Page[ModelOut](data=data, count=len(data))


@router.get("/{model_id}", response_model=ModelOut, summary="One bundle (id, prefix or name)")
def get_model(model_id: str, cloud: CloudDep) -> ModelOut:
    return model_out(_find(cloud, model_id), cloud.active_model)


@router.get("/{model_id}/edge", summary="The bundle's edge part (bundle.json + int8 encoder) "
            "as a zip, for rollout", response_class=Response,
            responses={200: {"content": {"application/zip": {}}}})
def get_edge(model_id: str, cloud: CloudDep) -> Response:
    manifest = _find(cloud, model_id)
    data = edge_archive(cloud.model_folder(manifest.id))
    return Response(data, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{manifest.name}-{manifest.id[:12]}.zip"'})


@router.post("/{model_id}/activate", response_model=Activated, dependencies=[WriteAccess],
             summary="Make a bundle active and announce it to the APs on ctl",
             responses={409: {"description": "the bundle's held-out accuracy is below its "
                                             "parent's, or it was never tested on held-out "
                                             "recordings; repeat with force=true to activate "
                                             "it anyway"}})
async def activate(model_id: str, cloud: CloudDep,
                   force: Annotated[bool, Query(description="activate even if the bundle "
                                                            "scores below its parent or has "
                                                            "no held-out score")] = False
                   ) -> Activated:
    manifest = _find(cloud, model_id)
    refusal = activation_refusal(manifest)
    if refusal is not None and not force:
        raise HTTPException(status.HTTP_409_CONFLICT, f"{refusal}; add force=true to "
                                                      "activate it anyway")
    try:
        announced = await cloud.activate(manifest.id)
    except NotConnectedError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
    return Activated(id=manifest.id, announced_to=announced)
