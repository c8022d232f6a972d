"""The segmentation demo behind `zoo segment`: read any image, segment it, draw and describe the result.

    from train import segment_demo
    report = segment_demo.run(image_path="digits.png", out="segment.png")      # a file
    report = segment_demo.run(scene_size=(333, 777), seed=0, out="scene.png")  # a generated scene

Reading (`read_image`): PNG/JPEG/anything Pillow opens, grayscale or RGB(A), 8 or 16 bit. Transparent
pixels become background: the image is composited over the colour opposite to its ink. Digits are
expected light on dark as in MNIST; an image whose median is light (dark ink on paper) is inverted.
The drawing (`draw`): the input, the converted classifier's per-class dense score map (its
stride-4 cells, each coloured by its best class, faded by confidence, plus one small probability map
per class), the FCN-8s result over the input, and a legend.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from train import segment as seg
from train import segment_data as sd

# Tableau-like colours for the ten digits; background is drawn transparent.
CLASS_COLORS = np.array([
    [0.12, 0.47, 0.71], [1.00, 0.50, 0.05], [0.17, 0.63, 0.17], [0.84, 0.15, 0.16], [0.58, 0.40, 0.74],
    [0.55, 0.34, 0.29], [0.89, 0.47, 0.76], [0.74, 0.74, 0.13], [0.09, 0.75, 0.81], [1.00, 0.90, 0.35],
    [0.00, 0.00, 0.00]], np.float32)
MIN_REGION_PIXELS = 30   # smaller connected regions are not reported as digits
DISPLAY_NAMES = {"fcn8s": "FCN-8s", "fcn16s": "FCN-16s", "fcn32s": "FCN-32s"}


def read_image(path, *, invert: bool | None = None) -> tuple[np.ndarray, dict]:
    """(H, W) float32 in [0, 1], light digits on dark, from an image file; plus what was done to it.

    Raises ValueError (not an image, truncated, too small, too large) or FileNotFoundError.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    notes = {}
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > seg.MAX_PIXELS:
                raise ValueError(f"{path} is {width}x{height} ({width * height / 1e6:.0f} megapixels); the limit is "
                                 f"{seg.MAX_PIXELS / 1e6:.0f} megapixels. Downscale it first.")
            img.load()
            notes["mode"] = img.mode
            has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
            if has_alpha:
                rgba = np.asarray(img.convert("RGBA"), np.float32) / 255.0
                gray = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
                alpha = rgba[..., 3]
                opaque = alpha > 0.5
                ink_is_dark = opaque.any() and float(gray[opaque].mean()) < 0.5
                paper = 1.0 if ink_is_dark else 0.0
                array = gray * alpha + paper * (1 - alpha)
                notes["alpha"] = f"composited over {'white' if paper else 'black'}"
            elif img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raw = np.asarray(img, np.float32)
                span = float(raw.max() - raw.min())
                array = (raw - raw.min()) / span if span > 0 else np.zeros_like(raw)
            else:
                array = np.asarray(img.convert("L"), np.float32) / 255.0
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image Pillow can read (PNG, JPEG, BMP, ...)") from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt data
        raise ValueError(f"{path} could not be decoded ({e}); the file is truncated or damaged") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e}") from None
    if invert is None:
        invert = float(np.median(array)) > 0.5
    if invert:
        array = 1.0 - array
    notes["inverted"] = bool(invert)
    return seg.check_image_array(array), notes


@dataclasses.dataclass
class Region:
    """One connected region of a digit class in the FCN-8s labels."""

    label: int
    box: tuple[int, int, int, int]   # top, left, height, width
    pixels: int
    confidence: float                # mean softmax of the label over the region


def find_regions(labels: np.ndarray, probabilities: np.ndarray) -> list[Region]:
    """Connected regions of non-background labels, largest class per region, reading order."""
    from scipy import ndimage

    foreground = labels != sd.BACKGROUND
    # Strokes of one digit can break apart at the ink threshold: join pixels 2 apart.
    components, _ = ndimage.label(ndimage.binary_dilation(foreground, iterations=2))
    regions = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        mask = (components[box] == index) & foreground[box]
        if mask.sum() < MIN_REGION_PIXELS:
            continue
        classes, counts = np.unique(labels[box][mask], return_counts=True)
        cls = int(classes[counts.argmax()])
        confidence = float(probabilities[box][..., cls][mask].mean())
        regions.append(Region(cls, (box[0].start, box[1].start, box[0].stop - box[0].start,
                                    box[1].stop - box[1].start), int(mask.sum()), confidence))
    # Reading order: rows of regions (by the box centre, in bands of ~40 px), then left to right.
    return sorted(regions, key=lambda r: ((r.box[0] + r.box[2] // 2) // 40, r.box[1]))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


@dataclasses.dataclass
class Segmentation:
    image: np.ndarray              # (H, W) in [0, 1]
    labels: np.ndarray             # (H, W) FCN labels
    probabilities: np.ndarray      # (H, W, 11)
    classifier_probs: np.ndarray   # (h, w, 10) at the classifier's cells
    classifier_labels: np.ndarray  # (H, W) baseline labels
    regions: list[Region]
    seconds: float                 # FCN + classifier, compilation excluded
    compile_seconds: float
    compilations: int
    stride: int
    name: str = "FCN-8s"           # the network that made `labels`


class Segmenter:
    """The shipped FCN (default FCN-8s) beside the converted classifier it grew from.

    Both run through `train.segment.SegmentPredictor` (shape buckets, tiles for big images).
    """

    def __init__(self, variant: str = "fcn8s", tag: str = seg.DEFAULT_TAG, *, weights_dir=None):
        from train import segment_models as sm

        self.meta = seg.shipped_metadata(variant, tag, weights_dir)
        self.model = seg.load_shipped(variant, tag, weights_dir=weights_dir)
        self.threshold = float(self.meta.get("baseline_threshold", 0.9))
        self.fcn = seg.SegmentPredictor(self.model)
        self.classifier = self._classifier(sm)

    def _classifier(self, sm):
        import zoo
        from convert.fcn import to_fcn
        from zoo import pretrained

        source = self.meta.get("classifier", {})
        tag = source.get("tag") if isinstance(source, dict) else None
        if tag and tag in pretrained.available_tags(seg.CLASSIFIER):
            classifier = zoo.create_model(seg.CLASSIFIER, pretrained=tag)
            self.classifier_note = f"{seg.CLASSIFIER} pretrained={tag}"
        else:
            # Without the original weights, show the classifier head the FCN kept (the backbone is
            # fine-tuned, so this is only an approximation of the converted classifier).
            classifier = None
            self.classifier_note = "the FCN's own backbone with its 10 class filters (classifier weights missing)"
        if classifier is None:
            backbone_fcn = _fcn_as_classifier_scores(self.model)
            return seg.SegmentPredictor(backbone_fcn)
        classifier.eval()
        return seg.SegmentPredictor(sm.ConvertedClassifierScores(
            to_fcn(classifier), mean=self.model.mean, std=self.model.std))

    @property
    def compilations(self) -> int:
        return self.fcn.compilations + self.classifier.compilations

    def segment(self, image: np.ndarray) -> Segmentation:
        image = seg.check_image_array(image)
        compiled_before = self.fcn.compile_seconds + self.classifier.compile_seconds
        start = time.perf_counter()
        scores = self.fcn.predict(image)
        classifier_scores = self.classifier.predict(image)
        seconds = time.perf_counter() - start
        compile_seconds = self.fcn.compile_seconds + self.classifier.compile_seconds - compiled_before
        probabilities = softmax(scores)
        labels = scores.argmax(-1).astype(np.uint8)
        stride = self.model.total_stride
        # The classifier's own cells: one per stride x stride block, sampled at the block centre.
        centre = stride // 2
        cells = softmax(classifier_scores[centre::stride, centre::stride])
        return Segmentation(image, labels, probabilities, cells,
                            seg.classifier_labels(classifier_scores, self.threshold),
                            find_regions(labels, probabilities), seconds - compile_seconds, compile_seconds,
                            self.compilations, stride, DISPLAY_NAMES[self.model.variant])


def _fcn_as_classifier_scores(model):
    from flax import nnx

    from train import segment_models as sm

    class KeptClassFilters(nnx.Module):
        def __init__(self, net):
            self.net = sm.SegmentationFCN(nnx.clone(net.backbone), nnx.clone(net.score), skips=0, mean=net.mean,
                                          std=net.std, num_classes=net.num_classes)

        def __call__(self, x):
            return self.net(x)[..., :10]

    return KeptClassFilters(model)


# ---------------------------------------------------------------------------------------------
# Drawing


def colorize(labels: np.ndarray, image: np.ndarray, alpha: float = 0.75) -> np.ndarray:
    """(H, W, 3) RGB: the image in gray, each digit class's pixels tinted with its colour."""
    rgb = np.repeat(image[..., None], 3, axis=-1) * 0.6
    tint = CLASS_COLORS[np.minimum(labels, sd.BACKGROUND)]
    digit = (labels < sd.BACKGROUND)[..., None]
    return np.clip(np.where(digit, (1 - alpha) * rgb + alpha * tint + 0.25 * image[..., None], rgb), 0, 1)


def classifier_map(cells: np.ndarray) -> np.ndarray:
    """(h, w, 3): each classifier cell in its best class's colour, brightness = that class's probability."""
    best = cells.argmax(-1)
    confidence = cells.max(-1, keepdims=True)
    return CLASS_COLORS[best] * confidence


def draw(result: Segmentation, path, *, title: str = "", truth: np.ndarray | None = None,
         max_side: int = 1400) -> Path:
    """Write the overlay PNG: input | converted classifier's score map | FCN result [| truth], then one
    small probability map per digit class (the classifier's) and a legend.

    Wide images stack the big panels vertically, tall ones side by side. Images larger than
    `max_side` are drawn subsampled (the labels are computed at full resolution).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image, labels = result.image, result.labels
    height, width = image.shape
    step = max(1, int(np.ceil(max(height, width) / max_side)))
    shown_image, shown_labels = image[::step, ::step], labels[::step, ::step]
    panels = [("input", np.repeat(shown_image[..., None], 3, -1)),
              (f"converted classifier ({result.stride}x{result.stride} cells)", classifier_map(result.classifier_probs)),
              (result.name, colorize(shown_labels, shown_image))]
    if truth is not None:
        panels.append(("ground truth", colorize(np.where(truth == sd.VOID, sd.BACKGROUND, truth)[::step, ::step],
                                                 shown_image)))
    n, aspect = len(panels), height / width
    wide = aspect <= 1.0
    gap, title_h, pad = 0.12, 0.28, 0.25           # inches
    if wide:
        panel_w = 10.0
        panel_h = panel_w * aspect
        fig_w = panel_w + 2 * pad
        main_h = n * (panel_h + title_h + gap)
    else:
        panel_h = 7.0 if n * 7.0 / aspect <= 16 else 16 * aspect / n
        panel_w = panel_h / aspect
        fig_w = n * (panel_w + gap) + 2 * pad
        main_h = panel_h + title_h + gap
    small_w = (fig_w - 2 * pad - 9 * 0.06) / 10
    small_h = small_w * aspect
    strip_h = small_h + title_h + 0.1
    legend_h, header_h = 0.55, (0.75 if title else 0.1)
    fig_h = header_h + main_h + strip_h + legend_h + pad
    fig = plt.figure(figsize=(fig_w, fig_h))

    def axes(left, top, w, h):  # inches from the top-left corner -> figure fractions
        ax = fig.add_axes([left / fig_w, 1 - (top + h) / fig_h, w / fig_w, h / fig_h])
        ax.set_xticks([])
        ax.set_yticks([])
        return ax

    top = header_h
    for k, (name, rgb) in enumerate(panels):
        if wide:
            left, panel_top = pad, top + k * (panel_h + title_h + gap) + title_h
        else:
            left, panel_top = pad + k * (panel_w + gap), top + title_h
        ax = axes(left, panel_top, panel_w, panel_h)
        ax.imshow(rgb, interpolation="nearest", extent=(0, width, height, 0), aspect="auto")
        ax.set_title(name, fontsize=9, loc="left", pad=3)
        if name == result.name:
            for region in result.regions:
                r_top, r_left, _, w = region.box
                ax.text(r_left + w / 2, max(r_top - 1, 0), str(region.label), color="white", fontsize=7,
                        ha="center", va="bottom", fontweight="bold", clip_on=True)
    top += main_h
    for cls in range(10):
        ax = axes(pad + cls * (small_w + 0.06), top + title_h, small_w, small_h)
        ax.imshow(result.classifier_probs[..., cls], cmap="magma", vmin=0, vmax=1, interpolation="nearest",
                  extent=(0, width, height, 0), aspect="auto")
        ax.set_title(f"classifier P({cls})", fontsize=7, pad=2, color=CLASS_COLORS[cls] * 0.8)
    top += strip_h
    legend_ax = axes(pad, top, fig_w - 2 * pad, legend_h)
    legend_ax.axis("off")
    handles = [Patch(color=CLASS_COLORS[c], label=f"digit {sd.CLASS_NAMES[c]}") for c in range(10)]
    handles.append(Patch(facecolor="0.35", edgecolor="0.2", label="background"))
    legend_ax.legend(handles=handles, ncol=6 if not wide and fig_w < 9 else 11, loc="center", fontsize=8,
                     frameon=False, handlelength=1.2, columnspacing=1.0)
    if title:
        fig.text(pad / fig_w, 1 - 0.12 / fig_h, title, fontsize=10, va="top", ha="left", wrap=True)
        fig.text(pad / fig_w, 1 - 0.42 / fig_h, "classifier panel: each cell's best digit, brighter = more probable; "
                 f"{result.name}: each pixel's class, background left gray", fontsize=8, va="top", ha="left", color="0.3",
                 wrap=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, facecolor="white")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The command


def run(*, image_path=None, scene_size=None, seed: int = 0, out=None, invert: bool | None = None,
        variant: str = "fcn8s", say=print) -> dict:
    """Segment a file or a generated scene, write the picture, print and return what was found."""
    if (image_path is None) == (scene_size is None):
        raise ValueError("give an IMAGE file or --scene WxH (one of them)")
    truth = None
    if scene_size is not None:
        scene = sd.generate_scene("test", seed, size=scene_size)
        image = scene.image.astype(np.float32) / 255.0
        truth = scene.label
        name = f"scene {scene_size[1]}x{scene_size[0]} (seed {seed}, MNIST test digits)"
        default_out = f"segment-scene-{scene_size[1]}x{scene_size[0]}-seed{seed}.png"
        notes = {}
    else:
        image, notes = read_image(image_path, invert=invert)
        name = str(image_path)
        default_out = f"{Path(image_path).stem}-segment.png"
    out = Path(out) if out else Path(default_out)
    segmenter = Segmenter(variant)
    result = segmenter.segment(image)
    report = {
        "input": name, "size": [int(image.shape[1]), int(image.shape[0])], "notes": notes,
        "regions": [{"digit": r.label, "box_tlhw": list(map(int, r.box)), "pixels": r.pixels,
                     "confidence": round(r.confidence, 3)} for r in result.regions],
        "seconds_per_image": round(result.seconds, 3), "compile_seconds": round(result.compile_seconds, 2),
        "compilations": result.compilations, "buckets": [list(b) for b in segmenter.fcn.buckets],
        "classifier": segmenter.classifier_note,
    }
    if truth is not None:
        fcn_scores = seg.scores_from(seg.confusion(truth, result.labels))
        base_scores = seg.scores_from(seg.confusion(truth, result.classifier_labels))
        report["truth_digits"] = sorted(d["label"] for d in scene.digits)
        report["fcn_mean_iou"] = round(fcn_scores["mean_iou"], 4)  # the chosen variant's
        report["fcn_pixel_accuracy"] = round(fcn_scores["pixel_accuracy"], 4)
        report["classifier_mean_iou"] = round(base_scores["mean_iou"], 4)
    title = (f"{name}: {len(result.regions)} digit region(s) found by {result.name}"
             + (f"; mean IU {report['fcn_mean_iou']:.3f} vs converted classifier "
                f"{report['classifier_mean_iou']:.3f}" if truth is not None else ""))
    draw(result, out, title=title, truth=truth)
    report["picture"] = str(out)
    say(f"{name}: {image.shape[1]}x{image.shape[0]} px" + (f" ({', '.join(f'{k}: {v}' for k, v in notes.items())})"
                                                          if notes else ""))
    found = ", ".join(str(r.label) for r in result.regions) or "none"
    say(f"found {len(result.regions)} digit region(s), in reading order: {found}")
    for r in result.regions[:40]:
        top, left, h, w = r.box
        say(f"  digit {r.label} at x={left}..{left + w - 1}, y={top}..{top + h - 1} "
            f"({r.pixels} px, confidence {r.confidence:.2f})")
    if len(result.regions) > 40:
        say(f"  ... and {len(result.regions) - 40} more")
    if truth is not None:
        say(f"ground truth: {len(scene.digits)} digits; {result.name} mean IU {report['fcn_mean_iou']:.3f}, "
            f"pixel accuracy {report['fcn_pixel_accuracy']:.3f}; converted classifier mean IU "
            f"{report['classifier_mean_iou']:.3f}")
    say(f"time per image: {result.seconds:.3f} s (both networks, compilation excluded); "
        f"{result.compilations} compilation(s) taking {result.compile_seconds:.1f} s; device: "
        f"{seg.jax.devices()[0].platform}")
    say(f"picture: {out.resolve()}")
    return report
