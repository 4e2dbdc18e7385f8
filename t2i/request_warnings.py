"""What a caller should tell the user about a request that will run, but not as they probably hope.

Generic, from a pipeline's `capabilities` and `defaults` only (any family): a size other than the
one the model was trained at, a region weight without regions. Family-specific warnings (a prompt
outside a model's vocabulary) come back from `pipe.run` in `GenerationResult.warnings`.
"""

from __future__ import annotations

from dataclasses import replace

from t2i.systems.base import GenerationRequest, Pipeline


def resolved_request(pipe: Pipeline, request: GenerationRequest) -> GenerationRequest:
    """The request with the model's defaults filled in, and the size an img2img input (else a
    ControlNet's conditioning image) gives (its own size rounded down to the model's size multiple)
    where no width/height is set."""
    source = request.init_image if request.init_image is not None else request.control_image
    if source is not None:
        m = pipe.capabilities.size_multiple
        request = replace(request, width=request.width or source.width // m * m,
                          height=request.height or source.height // m * m)
    return request.with_defaults(pipe.defaults)


def size_warning(pipe: Pipeline, request: GenerationRequest) -> str | None:
    """A one-line warning when the request's size is not the model's native size; else None.

    A model composes for the canvas it was trained on: the 64x64 shapes model asked for 256x256
    tiles the canvas with dozens of shapes, SD 1.5 at 1024 repeats its subject."""
    r = resolved_request(pipe, request)
    native = pipe.capabilities.native_size
    if (r.width, r.height) == native:
        return None
    return (f"{r.width}x{r.height} is not the native size of {pipe.name} ({native[0]}x{native[1]}, what it was "
            "trained at): other sizes compose worse (repeated or scattered objects)")


def regions_warning(request: GenerationRequest) -> str | None:
    """A one-line warning when a paint-with-words weight is given without any region (it does nothing)."""
    if request.region_weight is not None and not request.regions:
        return "a region weight without regions does nothing (give regions: --region X0,Y0,X1,Y1:WORDS)"
    return None
