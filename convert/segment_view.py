"""What `zoo segment` shows: any segmentation net's labels over the image, beside the converted classifier.

    view = SegmentView(net, class_names, classifier=fcn, classifier_preprocessing=record)
    result = view.segment(image)          # image: (H, W, C) floats in [0, 1]
    draw(result, "segment.png", truth=labels)

Both networks run through `convert.DensePredictor` (shape buckets, tiles for big images). The
picture: the input, the converted classifier's dense score map (each of its cells in the colour of
its best class, brighter = more probable; shown when the net's first classes are the classifier's),
the net's labels tinted over the input, the ground truth when there is one, one small probability
map per class of the classifier, and a legend with the data set's class names.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from convert.predict import DensePredictor

MIN_REGION_PIXELS = 30   # smaller connected regions are not reported
VOID = 255
# Tableau colours for the first ten classes (the digits keep the colours they always had), then more.
BASE_COLORS = np.array([
    [0.12, 0.47, 0.71], [1.00, 0.50, 0.05], [0.17, 0.63, 0.17], [0.84, 0.15, 0.16], [0.58, 0.40, 0.74],
    [0.55, 0.34, 0.29], [0.89, 0.47, 0.76], [0.74, 0.74, 0.13], [0.09, 0.75, 0.81], [1.00, 0.90, 0.35]], np.float32)


def class_colors(num_classes: int, background: int | None) -> np.ndarray:
    """(K, 3) RGB colours: BASE_COLORS, then evenly spaced hues; background is black (drawn untinted)."""
    import colorsys

    extra = [colorsys.hsv_to_rgb((k * 0.618) % 1.0, 0.65, 0.95) for k in range(max(0, num_classes - 10))]
    colors = np.concatenate([BASE_COLORS, np.array(extra, np.float32).reshape(-1, 3)])[:num_classes].copy()
    if background is not None:
        colors[background] = 0.0
    return colors


def background_index(class_names) -> int | None:
    names = [str(n).lower() for n in class_names]
    return names.index("background") if "background" in names else None


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


@dataclasses.dataclass
class Region:
    """One connected region of a class in the labels."""

    label: int
    box: tuple[int, int, int, int]   # top, left, height, width
    pixels: int
    confidence: float                # mean softmax of the label over the region


def find_regions(labels: np.ndarray, probabilities: np.ndarray, background: int | None) -> list[Region]:
    """Connected regions of non-background labels, the largest class per region, in reading order."""
    from scipy import ndimage

    foreground = labels != background if background is not None else np.ones(labels.shape, bool)
    # Strokes of one object can break apart at a threshold: join pixels 2 apart.
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


@dataclasses.dataclass
class Segmentation:
    image: np.ndarray                       # (H, W, C) in [0, 1]
    labels: np.ndarray                      # (H, W) the net's labels
    probabilities: np.ndarray               # (H, W, K)
    classifier_cells: np.ndarray | None     # (h, w, K0) the converted classifier's probabilities per cell
    classifier_stride: int
    classifier_extent: tuple | None         # (left, right, bottom, top) pixels the cells cover (imshow extent)
    regions: list[Region]
    seconds: float                          # both networks, compilation excluded
    compile_seconds: float
    compilations: int
    name: str                               # the net that made `labels`, e.g. "FCN-8s"


class SegmentView:
    """A segmentation net, and optionally the converted classifier it grew from, on images of any size.

    Args:
        net: a `convert.SegmentationFCN`.
        class_names: one per class of the net (the data set's).
        classifier: the converted classifier (`convert.FCN`) to show beside it, or None.
        classifier_preprocessing: its recorded preprocessing (it takes x_net = (uint8 * scale - mean) / std).
        fold: fold the BatchNorms into their convolutions (`DensePredictor`).
    """

    def __init__(self, net, class_names, *, classifier=None, classifier_preprocessing: dict | None = None,
                 fold: bool = True):
        from convert.segment import DISPLAY_NAMES

        self.net = DensePredictor(net, fold=fold)
        self.name = DISPLAY_NAMES[net.variant]
        self.class_names = [str(n) for n in class_names]
        if len(self.class_names) != net.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a net with {net.num_classes} classes")
        self.background = background_index(self.class_names)
        self.colors = class_colors(net.num_classes, self.background)
        self.classifier = DensePredictor(classifier, score_map=True) if classifier is not None else None
        self.preprocessing = classifier_preprocessing

    @property
    def compilations(self) -> int:
        return self.net.compilations + (self.classifier.compilations if self.classifier else 0)

    def _compile_seconds(self) -> float:
        return self.net.compile_seconds + (self.classifier.compile_seconds if self.classifier else 0.0)

    def segment(self, image: np.ndarray) -> Segmentation:
        """image: (H, W, C) floats in [0, 1]."""
        compiled_before = self._compile_seconds()
        start = time.perf_counter()
        scores = self.net.predict(image).scores
        cells, stride, extent = None, 1, None
        if self.classifier is not None:
            record = self.preprocessing or {"scale": 1 / 255, "mean": [0.0], "std": [1.0]}
            x = (image * 255.0 * float(record["scale"]) - np.asarray(record["mean"], np.float32)) \
                / np.asarray(record["std"], np.float32)
            result = self.classifier.predict(x.astype(np.float32))
            cells, g = result.probabilities(), result.geometry
            stride = int(g.stride[0])
            centre = [o + (r - 1) / 2 for o, r in zip(g.offset, g.receptive_field)]
            rows, cols = cells.shape[:2]
            extent = (centre[1] - g.stride[1] / 2, centre[1] + (cols - 0.5) * g.stride[1],
                      centre[0] + (rows - 0.5) * g.stride[0], centre[0] - g.stride[0] / 2)
        seconds = time.perf_counter() - start
        compile_seconds = self._compile_seconds() - compiled_before
        probabilities = softmax(scores)
        labels = scores.argmax(-1).astype(np.uint8)
        return Segmentation(image, labels, probabilities, cells, stride, extent,
                            find_regions(labels, probabilities, self.background), seconds - compile_seconds,
                            compile_seconds, self.compilations, self.name)


# ---------------------------------------------------------------------------------------------
# Drawing


def _gray(image: np.ndarray) -> np.ndarray:
    return image[..., 0] if image.shape[-1] == 1 else image @ np.array([0.299, 0.587, 0.114], np.float32)


def colorize(labels: np.ndarray, image: np.ndarray, colors: np.ndarray, background: int | None,
             alpha: float = 0.75) -> np.ndarray:
    """(H, W, 3) RGB: the image dimmed, each non-background class's pixels tinted with its colour."""
    base = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    rgb = base * 0.6
    shown = np.where(labels == VOID, background if background is not None else 0, labels)
    tint = colors[np.minimum(shown, len(colors) - 1)]
    tinted = shown != background if background is not None else np.ones(labels.shape, bool)
    return np.clip(np.where(tinted[..., None], (1 - alpha) * rgb + alpha * tint + 0.25 * _gray(image)[..., None], rgb),
                   0, 1)


def draw(result: Segmentation, path, *, class_names, colors: np.ndarray, background: int | None, title: str = "",
         truth: np.ndarray | None = None, max_side: int = 1400) -> Path:
    """Write the picture: input | converted classifier's score map | net's labels [| truth], a strip of the
    classifier's per-class probability maps, and a legend. Wide images stack the panels, tall ones sit side
    by side; images above `max_side` are drawn subsampled (labels are computed at full resolution)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image, labels = result.image, result.labels
    height, width = image.shape[:2]
    step = max(1, int(np.ceil(max(height, width) / max_side)))
    shown_image, shown_labels = image[::step, ::step], labels[::step, ::step]
    panels = [("input", np.repeat(shown_image, 3, -1) if shown_image.shape[-1] == 1 else shown_image)]
    cells = result.classifier_cells
    if cells is not None:
        best = colors[np.minimum(cells.argmax(-1), len(colors) - 1)] * cells.max(-1, keepdims=True)
        panels.append((f"converted classifier ({result.classifier_stride}x{result.classifier_stride} px cells)", best))
    panels.append((result.name, colorize(shown_labels, shown_image, colors, background)))
    if truth is not None:
        panels.append(("ground truth", colorize(truth[::step, ::step], shown_image, colors, background)))
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
    strip = [] if cells is None else list(range(min(cells.shape[-1], 10)))
    small_w = (fig_w - 2 * pad - 9 * 0.06) / 10
    small_h = small_w * aspect
    strip_h = small_h + title_h + 0.1 if strip else 0.0
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
        extent = result.classifier_extent if name.startswith("converted classifier") else (0, width, height, 0)
        if wide:
            left, panel_top = pad, top + k * (panel_h + title_h + gap) + title_h
        else:
            left, panel_top = pad + k * (panel_w + gap), top + title_h
        ax = axes(left, panel_top, panel_w, panel_h)
        ax.set_facecolor("black")
        ax.imshow(rgb, interpolation="nearest", extent=extent, aspect="auto")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(name, fontsize=9, loc="left", pad=3)
        if name == result.name:
            for region in result.regions:
                r_top, r_left, _, w = region.box
                ax.text(r_left + w / 2, max(r_top - 1, 0), class_names[region.label], color="white", fontsize=7,
                        ha="center", va="bottom", fontweight="bold", clip_on=True)
    top += main_h
    for cls in strip:
        ax = axes(pad + cls * (small_w + 0.06), top + title_h, small_w, small_h)
        ax.set_facecolor("black")
        ax.imshow(cells[..., cls], cmap="magma", vmin=0, vmax=1, interpolation="nearest",
                  extent=result.classifier_extent, aspect="auto")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(f"classifier P({class_names[cls]})", fontsize=7, pad=2, color=colors[cls] * 0.8)
    top += strip_h
    legend_ax = axes(pad, top, fig_w - 2 * pad, legend_h)
    legend_ax.axis("off")
    handles = [Patch(color=colors[c], label=class_names[c]) for c in range(len(class_names)) if c != background]
    if background is not None:
        handles.append(Patch(facecolor="0.35", edgecolor="0.2", label=class_names[background]))
    legend_ax.legend(handles=handles, ncol=min(len(handles), 6 if not wide and fig_w < 9 else 11), loc="center",
                     fontsize=8, frameon=False, handlelength=1.2, columnspacing=1.0)
    if title:
        fig.text(pad / fig_w, 1 - 0.12 / fig_h, title, fontsize=10, va="top", ha="left", wrap=True)
        legend = (("classifier panel: each cell's best class, brighter = more probable; " if cells is not None else "")
                  + f"{result.name}: each pixel's class" + (", background left gray" if background is not None else ""))
        fig.text(pad / fig_w, 1 - 0.42 / fig_h, legend, fontsize=8, va="top", ha="left", color="0.3", wrap=True)
    from zoo.saving import save_figure

    return save_figure(fig, path, dpi=100, facecolor="white")
