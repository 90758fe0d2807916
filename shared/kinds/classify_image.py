"""classify-image: photographs (JPEG, PNG or WebP) into the 1,000 ImageNet classes with
EfficientNet-Lite0, or into a store model's own classes. Each image is one batch item: images
from many jobs share one forward pass.

An image is ``{"path": "/abs/file.jpg"}`` (a file the worker reads, under
``CONVEYOR_INPUT_ROOTS``) or ``{"b64": "..."}`` (the file's bytes inline). `conveyor submit
classify-image --image FILE` sends files inline; `conveyor score classify-image FILE --column C`
sends each row's path as ``{"path": ...}``.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.jobs import FilePath, JobBase, ModelRef
from shared.kinds.spec import CliOption, KindSpec, ScoreColumn
from shared.results import JobMeta

MAX_IMAGES_PER_JOB: Final = 64
MAX_INLINE_IMAGE_BYTES: Final = 10 * 1024 * 1024  # one inline image, decoded
# All inline images of one job together, decoded: 32 MiB is ~43 MiB of base64, inside the
# 64 MiB a message may hold.
MAX_INLINE_BYTES_PER_JOB: Final = 32 * 1024 * 1024
MAX_TOP_K: Final = 1000
BUILTIN_IMAGE_MODEL: Final = "efficientnet-lite0"


class ImageRef(BaseModel):
    """One image: exactly one of ``path`` or ``b64``."""

    model_config = ConfigDict(extra="forbid")

    path: FilePath | None = Field(
        default=None, description="Absolute path of a JPEG, PNG or WebP file on the worker (under its input roots)."
    )
    b64: Base64Bytes | None = Field(
        default=None,
        description=f"The image file's bytes, base64-encoded (at most {MAX_INLINE_IMAGE_BYTES} bytes decoded).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ImageRef:
        if (self.path is None) == (self.b64 is None):
            raise ValueError("give exactly one of 'path' or 'b64'")
        if self.b64 is not None:
            if not self.b64:
                raise ValueError("b64 is empty")
            if len(self.b64) > MAX_INLINE_IMAGE_BYTES:
                raise ValueError(
                    f"b64 holds {len(self.b64)} bytes, over the limit of {MAX_INLINE_IMAGE_BYTES} per inline image"
                    " (MAX_INLINE_IMAGE_BYTES): send a path instead, or a smaller image"
                )
        return self

    def source(self) -> str:
        """How errors name the image: its path as sent, or the size of inline bytes (never its contents)."""
        if self.path is not None:
            return f"path {self.path}"
        return f"inline b64, {len(self.b64 or b'')} bytes"


class ClassifyImageJob(JobBase):
    """Classify one or many images (JPEG, PNG or WebP) with EfficientNet-Lite0 (ImageNet classes)."""

    type: Literal["classify-image"] = "classify-image"
    images: list[ImageRef] = Field(
        min_length=1,
        max_length=MAX_IMAGES_PER_JOB,
        description=f"Images (1 to {MAX_IMAGES_PER_JOB}): each {{'path': ...}} (a file on the worker), "
        f"{{'b64': ...}} (inline bytes, at most {MAX_INLINE_IMAGE_BYTES} each and {MAX_INLINE_BYTES_PER_JOB} "
        "in all).",
    )
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K, description="How many classes per image, best first.")
    model: ModelRef | None = Field(
        default=None,
        description="An EfficientNet-Lite0 image classifier in the model store (a directory with config.json naming "
        f"its labels, and model.pth). Unset, or {BUILTIN_IMAGE_MODEL}: the built-in ImageNet model (1,000 classes).",
    )

    @field_validator("images")
    @classmethod
    def _bounded_inline(cls, images: list[ImageRef]) -> list[ImageRef]:
        total = sum(len(image.b64) for image in images if image.b64 is not None)
        if total > MAX_INLINE_BYTES_PER_JOB:
            raise ValueError(
                f"the inline images hold {total} bytes in all, over the limit of {MAX_INLINE_BYTES_PER_JOB} per job"
                " (MAX_INLINE_BYTES_PER_JOB): send paths, or split them into several jobs"
            )
        return images


class ImageLabel(BaseModel):
    label: str
    score: float = Field(description="Softmax probability over the model's classes.")


class ImageClassification(BaseModel):
    label: str = Field(description="The best class (labels[0].label).")
    score: float = Field(description="Its probability (labels[0].score).")
    labels: list[ImageLabel] = Field(description="The top_k classes, best first.")


class ClassifyImageResult(BaseModel):
    job_id: str
    type: str = "classify-image"
    results: list[ImageClassification] = Field(description="One per input image, in order.")
    meta: JobMeta


# The demo's photograph: scikit-image's "chelsea" (a tabby cat; CC0, Stefan van der Walt), shrunk to
# 112 x 74 pixels as a 2.5 KB JPEG, so the demo needs no file on the worker. EfficientNet-Lite0 ranks it
# Egyptian cat 0.52, tabby 0.23, tiger cat 0.17.
DEMO_CAT_JPEG_B64: Final = (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAYEBQYFBAYGBQYHBwYIChAKCgkJChQODwwQFxQYGBcUFhYaHSUfGhsjHBYWICwgIyYn"
    "KSopGR8tMC0oMCUoKSj/2wBDAQcHBwoIChMKChMoGhYaKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgo"
    "KCgoKCgoKCj/wAARCABLAHADASIAAhEBAxEB/8QAGgAAAgMBAQAAAAAAAAAAAAAABQYDBAcBAv/EADcQAAIBAwMCBAUCBAUFAAAA"
    "AAECAwAEEQUSITFBBhNRYRQicYGRIzJCocHRBxVSsfEWJGJy8P/EABkBAAMBAQEAAAAAAAAAAAAAAAIDBAEABf/EACARAAICAwEB"
    "AQADAAAAAAAAAAABAhEDITESQQQiUWH/2gAMAwEAAhEDEQA/ADd7pvwxLRft9KRNW1T9R4SWLCQ4AHRT61qt9YuIpS7HZg/asu0y"
    "2dr1/MUyKScMo6DPWoP0fxSo9PA92E9BiFnELu5zG3TkcOOwqze3vmLmNVhUgkuw5HrUV1CGfyl8zyQP2KTjP9Ko3Aa8YBt6oPla"
    "MnKjPp+KQ56HXbshuZvOynlyzZ+Xk8AdM/1qmlukcoy5DMVLANlpCQc4z7irN6zwFYoI9q42tgZzVK3VYtQjDR5242+YvQ9iPx1o"
    "FJGtMJwNHLaT24ZhI6kNvwoHpkj6/wAqCLaPN4XsCXjvJYHCB05EY6fftz70c1SU2cEXkqCXkAAI4xgZ/wCfeuSxDTLiweBUSyu4"
    "2jaPphyBjHv/AGo/XwX5+itG1xBMjWMxDRP5silsjaeHXHccA/ema0v2e5WNgBno3uaHWO6zjnnlii3rDLJlRxuUBcAntnNW9N02"
    "ZorVbpo/NeISMy8Hk96ySs1OhpijeKENJI4B9G4xVS8njSJpJPliAzwRk1O5ZLSREDEofmB6jj/ahN9CFsIzM/LMdoPYU+E29IJU"
    "k2xJ12FtVvTPKuFA2onZRQs6Mn+mnZrRTyMVGbIHtR7J3T2zatbuCmnTlAGIU8Vls13mDbCwj29xxzRrXvFcV4HstPy5Pys4pHkk"
    "v78/DadbtHJ0eR14BHpS/wBDTaQeFUXbjxEsM/w81rLcHIJMTbcfT0NFtMlicjbFPAgPWReeffnNQ6ZoCW2nyC5w8kg+eUjksaJ6"
    "Hdi3la3ucDLYz2PapJP4ihJdBl94h0WJ5rGNZ7ufOZfKhJKfViOKE/8AU+hy3yC5kmtbhOB5qkfZscY9zVmCFbHVdcilQGX4rzuR"
    "y0bAbce3BFZnavPrHiW5S5hI8uaQYA/aM/KvvTccVL1fwmyZXCSSNb1mA3FzpiRsWhZslk54x/tRjXLJL2KxSLH/AGsyy5x6dR+K"
    "TP8ADy6kTWtQ0aRi0Nvh7fP8IP7lB9AacLstb3Oeny9zxk0Hh36/so9JoGWuiPe2eoiTOydG2o3bJ5GPsKtarbtEmlTsoDbRC+B3"
    "4/lxRm0cC0SY43YJ5+/NKvizxHb6PaQC5D3FwG85IU7DpuY9hzXRUpc6ZJxj3gwTIsd5uByHXDjPUe9Cb7Q57x2kEj89B6D0qjp/"
    "iy7m1CCK+sbf4WdCysjHIx1B9abrW/iUMIP1I8cEc1RhlUqETbSTQpvD8E3lynnHepI1WQZWhni27km1BVVXVe5xXbC6EMQDSH71"
    "SxW2Q+Elhjt1YndubfuycUw6bewxak1k6iEu25GzjdQ6yskjWSK3GwKo2gDnFc1e18y2hmI3GM4OOuKhkyuKQ7XsSSWTRgjBHUmk"
    "q7tleaTbkuSA6jg59akZNUNqDaXCzRkcB+GHtQ5Le8SVnuZJVlYY+TGT7c8Glyd/BkY/6EQTdeW9xIYbqMFIboDcSn+lx/EufuKo"
    "Xmj+IF82TTLDScycm7ilJP1CnofzUy3GZfKwzMBkkpjp7d+O1EbTfIjCNzFgDIPA9+P7Utrd0C4J9EjwclzpXjmE3jqxbMPyklem"
    "evetX1dEkc4wSVAOPas61608q5WWOQIUbcW6be5OaZtF1CO4jT9Xegzg+tbk/Q3tjI4kuBYSstmkIABLbeeeKzXxxo02ta9PJa3E"
    "Y8u4aOTLgbUwBg+nQVqtxAJdHklQ/qg7lPXGKSNLtNMuLNpNT06C8uhMw3uOTk559a7Fma2hWbD7VBHwfDb3moI8JSSy0+Jkef8A"
    "hkkbGQp7gAdfU05adqWlqHDBNoPUdKT726aWNba3CQWqjCxRqFUfjrQ+aR4zsHSqsLd+hU1SUTSWTQtQyMx598UI1Twhpk/MEwX/"
    "ANTSLsmWUeQTubsDRi30TVyBILiTnnGap9X1CtrjINJuMX6ySAqCNpJ6GmK7s1khJXG1h2PFIsTSw3ivsz5bZAB6j6da0fTZFubV"
    "SQRuGcAdKnglKNDpaYnNHLps26KVfIJ5UucD+VHdP2TqCrRuDzjOcVcu9LiYkhMg9iaB/CXWlXHmW8UK2zHLbjjHvyaCvL2Nu0GZ"
    "rGFwWljyvfbzQ6dUV2MZ3Y4wSMgf3ozY3aTWjS20kLv6lcAfmhOqLFLxNp0Uu5wxeJgOR0P/ABU+bT0FDfQTcW8F3amaNX3MpGx0"
    "K/kGl3SLj4fUpE34BPU45p+0GEDKyfEbSWOJhuwM9A3pSL4/8Mf5HKdS0tRPau4DQyuf0yT2Ppn8UGPC8l3wa8ihpD2LtDoNwhb5"
    "jyuOhpU0kTNaCPJYykkH1OeaBaKb/VZhZWTyInV23HCD6/8A3SnO009IdRgjjnQrbjbuaQ5Y45+UdKJY/NUDk1aZf0SyhgmK3rKz"
    "sOvp7UwxeGrOR/OyGB6UvXlvHIjDeyOx6hqvWOoHS0ijeVnTpk816WKSS8s8+e3Z6n0mC01SMjHJ4FM8DLtCgDilR703usK8Z3Io"
    "wKarRMRgnrTbVgGQtaC52ttHbpx98k1oPh2JYrJFBHA9etI3h6GNYwgX5QSMU56G7MgBP8qhxumVT2g265HGB70Nu4EYnK72/wDK"
    "iWSRzVSfrjtxT2gEBTCY3LEhuwz0+gH9aH3luCQwVd3XOOaNXIG8jHG7H2qi4yQT3zS5QT6Gm0CV1C4tht/VUexyD+aGa9fXGqaV"
    "PZEOyzLsO4ft96NzKMnjsa8WkSEZKg0SVcObvoO0G1OkaalvZQtg/vcjJc+pNFLJHhZ52CiQ9QFGTViclYvl4r1oaiS6/UG7Hr9K"
    "Fr09g3S0TWumT6jOsmDEnqaM3OlW9vYOvBbHU0agUCEYAGKFeImK6dMQcHBpsUJYG8MLZ26OzSoW3HPNMaanbliqlmx6Cs08BIsm"
    "vSBxuGDweR1rSLo+So8oBfoBTorRh//Z"
)


KIND = KindSpec(
    name="classify-image",
    job=ClassifyImageJob,
    result=ClassifyImageResult,
    mode="inference",
    runner="workers.runners.classify_image:ClassifyImageKind",
    summary="Classify images (JPEG, PNG or WebP) into ImageNet's 1,000 classes with EfficientNet-Lite0.",
    items="images",
    score_row="path",  # each row of `conveyor score` is a path the workers read
    score_columns=(
        ScoreColumn("label", "label", "string"),
        ScoreColumn("score", "score", "float"),
        ScoreColumn("ranking", "labels", "json"),
    ),
    cli={"images": CliOption(flag="--image", file="base64", key="b64")},
    example={"images": [{"path": "/data/cat.jpg"}], "top_k": 3},
    demo={"images": [{"b64": DEMO_CAT_JPEG_B64}], "top_k": 3},
    order=12,
    evaluation="workers.evaluators.images:ImageEvaluation",
    model_kinds=("image-classification",),
)
