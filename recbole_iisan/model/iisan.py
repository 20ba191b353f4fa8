"""IISAN (SIGIR 2024): the symmetric original of IISAN-Versa.

The same side-adapted networks, with the original's choices: text and image encoders of
one family and one width (BERT-base and ViT-base), every-other-layer taps, and wide heads
(Linear(width, width) then Linear(width, d) for every branch). Settings in IISAN.yaml.
"""
from recbole_iisan.model.iisan_versa import IISANVersa


class IISAN(IISANVersa):
    wide_intra_heads = True

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if "text" in self.specs and "image" in self.specs:
            text, image = self.specs["text"], self.specs["image"]
            if text.width != image.width or text.n_taps != image.n_taps:
                raise ValueError(
                    f"IISAN is symmetric: its text and image encoders need equal widths and tap counts, "
                    f"got text {text.width}-d x {text.n_taps} taps ({config['text_encoder']}) and image "
                    f"{image.width}-d x {image.n_taps} taps ({config['image_encoder']}); "
                    "use IISANVersa for asymmetric encoders"
                )
