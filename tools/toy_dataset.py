"""Write a small labelled toy dataset (grayscale shapes) as a folder of PNGs with dataset.json.

The quickstart uses it only when Fashion-MNIST is not available on the machine:

    python tools/toy_dataset.py --outdir=datasets/toy-shapes --count=2000 --resolution=32

Three classes (0 = disc, 1 = square, 2 = ring) of random size and position, drawn with anti-aliasing, so a
GAN has something learnable but easy; then `dataset_tool.py --source=datasets/toy-shapes --dest=...zip`.
"""

import json
import os

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw

CLASSES = ('disc', 'square', 'ring')


def draw_shape(rnd: np.random.RandomState, label: int, resolution: int) -> PIL.Image.Image:
    """One anti-aliased shape of class `label`, drawn at 4x and downsampled."""
    scale = 4
    size = resolution * scale
    image = PIL.Image.new('L', (size, size), color=int(rnd.randint(0, 40)))
    draw = PIL.ImageDraw.Draw(image)
    radius = rnd.uniform(0.18, 0.38) * size
    cx, cy = rnd.uniform(radius, size - radius, size=2)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    shade = int(rnd.randint(160, 256))
    if CLASSES[label] == 'disc':
        draw.ellipse(box, fill=shade)
    elif CLASSES[label] == 'square':
        draw.rectangle(box, fill=shade)
    else:
        draw.ellipse(box, outline=shade, width=max(int(radius * 0.3), scale))
    return image.resize((resolution, resolution), PIL.Image.LANCZOS)


def write_toy_dataset(outdir: str, count: int, resolution: int, seed: int = 0) -> None:
    if os.path.exists(outdir) and os.listdir(outdir):
        raise click.ClickException(f'"{outdir}" exists and is not empty')
    os.makedirs(outdir, exist_ok=True)
    rnd = np.random.RandomState(seed)
    labels = []
    for idx in range(count):
        label = idx % len(CLASSES)
        fname = f'{CLASSES[label]}{idx:05d}.png'
        draw_shape(rnd, label, resolution).save(os.path.join(outdir, fname))
        labels.append([fname, label])
    with open(os.path.join(outdir, 'dataset.json'), 'w') as f:
        json.dump({'labels': labels}, f)


@click.command()
@click.option('--outdir', required=True, type=click.Path(file_okay=False), help='Output folder (new or empty)')
@click.option('--count', type=click.IntRange(min=1), default=2000, show_default=True, help='Number of images')
@click.option('--resolution', type=click.IntRange(min=8), default=32, show_default=True, help='Image size')
@click.option('--seed', type=int, default=0, show_default=True, help='Random seed')
def main(outdir: str, count: int, resolution: int, seed: int) -> None:
    """Write a toy dataset of grayscale shapes in three classes."""
    write_toy_dataset(outdir, count, resolution, seed)
    print(f'Wrote {count} toy images to "{outdir}"')


if __name__ == '__main__':
    main()
