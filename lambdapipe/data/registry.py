"""The datasets we know: where each official archive lives, its md5, and its shape.

The md5s are those published with each archive (CIFAR) or pinned for it by torchvision and
fastai (Tiny ImageNet, the three Imagenette sizes). Tests swap in their own archives by
replacing a `DatasetInfo` in `DATASETS` explicitly (`dataclasses.replace`); there is
deliberately no switch that skips the check.
"""

from __future__ import annotations

from dataclasses import dataclass

from lambdapipe.errors import bad_value
from lambdapipe.noise import CIFAR10_CLASSES

IMAGENETTE_WNIDS = (  # sorted wnid order = class index, as fastai/torchvision number them
    ("n01440764", "tench"), ("n02102040", "English springer"),
    ("n02979186", "cassette player"), ("n03000684", "chain saw"), ("n03028079", "church"),
    ("n03394916", "French horn"), ("n03417042", "garbage truck"), ("n03425413", "gas pump"),
    ("n03445777", "golf ball"), ("n03888605", "parachute"),
)
# Columns of noisy_imagenette.csv: rate -> column holding that variant's labels.
IMAGENETTE_NOISE_COLUMNS = {0.01: "noisy_labels_1", 0.05: "noisy_labels_5",
                            0.25: "noisy_labels_25", 0.5: "noisy_labels_50"}


# Evaluation's usual resize-then-centre-crop (torchvision's ImageNet recipe: 256 -> 224): the
# shorter side goes to image_size / 0.875, then the centre image_size square is cut.
EVAL_CROP_FRACTION = 0.875
VAL_FOLDER = "official val folder"  # `val` of a dataset that validates on it (no test apart)


def resize_size(image_size: int) -> int:
    """The shorter side an image is resized to before its centre crop (146 for 128 px)."""
    return round(image_size / EVAL_CROP_FRACTION)


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: `source` picks the reader of its official layout (see sources.py)."""

    name: str
    num_classes: int
    image_size: int  # default training resolution (pixels per side)
    classes: tuple[str, ...] | None  # None until `prepare` reads them from the archive
    source: str
    url: str | None = None
    archive: str | None = None  # file name under data/raw and in a mirror dir
    md5: str | None = None
    size: int | None = None  # archive bytes: progress-bar total only, md5 is the check
    num_train: int = 0  # official training images (checked against --val-size up front)
    num_test: int = 0  # test images (for cost estimates: `bench --config`)
    sizes: tuple[int, ...] | None = None  # allowed --image-size values; None: any >= 8
    default_val_fraction: float = 0.1
    note: str = ""
    # Imagenette: keep each training image whole (shorter side resize_size) for crops drawn
    # at training time; every split also gets its resize-then-centre-crop evaluation view.
    whole_images: bool = False
    # Validate on the official val folder (and train on every official training image);
    # there is then no separate test: test holds the same images as val.
    val_is_val_folder: bool = False

    def layout_params(self, image_size: int) -> dict:
        """What `prepare` records beyond split and size, so data laid out otherwise is another
        run identity (provenance) and an old prepared directory is refused (prepared.py)."""
        out: dict = {}
        if self.whole_images:
            out |= {"train_images": "whole", "resize": resize_size(image_size)}
        if self.val_is_val_folder:
            out["val"] = VAL_FOLDER
        return out

    def check_image_size(self, image_size: int | None) -> int:
        """Resolve `--image-size` (None = default); refuse what this dataset cannot give."""
        if image_size is None:
            return self.image_size
        allowed = self.sizes or "an integer >= 8"
        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise bad_value(f"image size for {self.name}", image_size, allowed)
        if (self.sizes and image_size not in self.sizes) or image_size < 8:
            raise bad_value(f"image size for {self.name}", image_size, allowed)
        return image_size


_TINY = dict(num_classes=200, classes=None, source="tinyimagenet",
             url="https://cs231n.stanford.edu/tiny-imagenet-200.zip",
             archive="tiny-imagenet-200.zip", md5="90528d7ca1a48142e341f4ef8d21d0de",
             size=248100043, num_train=100_000, num_test=10_000,
             note="labelled official val set used as test")
_NETTE = dict(num_classes=10, image_size=128, classes=tuple(n for _, n in IMAGENETTE_WNIDS),
              source="imagenette", num_train=9469, num_test=3925, whole_images=True,
              note="official val set used as test; train images kept whole (shorter side "
                   "size/0.875) for crops at training time; evaluation: resize shorter side "
                   "to size/0.875, centre crop")
_NETTE_160 = dict(url="https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
                  archive="imagenette2-160.tgz", md5="e793b78cc4c9e9a4ccc0c1155377a412",
                  size=99003388)
# The Imagenette report's split (its "best val loss" is most likely on the val folder): all
# 9,469 training images trained on, the val folder validates, and nothing is left for test.
_REPORT_SPLIT = dict(_NETTE, val_is_val_folder=True,
                     note="the report's split: trains on all official training images, "
                          "validates on the official val folder; test = the same val folder "
                          "(no separate test)")

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("cifar10", 10, 32, CIFAR10_CLASSES, "cifar10",
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    archive="cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
                    size=170498071, sizes=(32,), num_train=50_000,
                    num_test=10_000),
        DatasetInfo("cifar100", 100, 32, None, "cifar100",
                    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                    archive="cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
                    size=169001437, sizes=(32,), num_train=50_000,
                    num_test=10_000),
        DatasetInfo("tinyimagenet32", image_size=32, sizes=(32,), **_TINY),
        DatasetInfo("tinyimagenet64", image_size=64, sizes=(64,), **_TINY),
        DatasetInfo("imagenette", **_NETTE, **_NETTE_160),
        DatasetInfo("imagenette_valfolder", **_REPORT_SPLIT, **_NETTE_160),
        DatasetInfo("imagenette320", **_NETTE,
                    url="https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
                    archive="imagenette2-320.tgz", md5="3df6f0d01a2c9592104656642f5e78a3"),
        DatasetInfo("imagenettefull", **_NETTE,
                    url="https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz",
                    archive="imagenette2.tgz", md5="fe2fc210e6bb7c5664d602c3cd71e612"),
        # Registered users' own archives (data/imagenet.py): no URL, read from raw/ or the
        # mirror. Official val sets are our test sets; val is cut from train as elsewhere.
        DatasetInfo("imagenet32", 1000, 32, None, "imagenet-downsampled", sizes=(32,),
                    num_train=1_281_167, num_test=50_000,
                    note="downsampled ImageNet 32x32 (Chrabaszcz et al. 2017); official val "
                         "set used as test"),
        DatasetInfo("imagenet64", 1000, 64, None, "imagenet-downsampled", sizes=(64,),
                    num_train=1_281_167, num_test=50_000,
                    note="downsampled ImageNet 64x64 (Chrabaszcz et al. 2017); official val "
                         "set used as test"),
        DatasetInfo("imagenet2012", 1000, 224, None, "ilsvrc2012", sizes=(224,),
                    num_train=1_281_167, num_test=50_000,
                    note="ILSVRC2012 JPEGs streamed from their archives (an index is "
                         "prepared); official val set used as test, ImageNet-V2 matched "
                         "frequency as test_v2 where its archive is present"),
        DatasetInfo("digits", 10, 16, tuple(str(d) for d in range(10)), "digits", sizes=(16,),
                    num_train=1438, num_test=359,
                    note="scikit-learn's bundled 8x8 digits upscaled to 16x16 RGB; "
                         "test = fixed seeded stratified 20% held out"),
    )
}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise bad_value("dataset", name, sorted(DATASETS)) from None
