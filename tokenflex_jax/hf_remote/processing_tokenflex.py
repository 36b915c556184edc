"""The processor of an exported TokenFLEX model: images through its SigLIP image
processor (resize to the tower's size, bicubic, then to [-1, 1]), text through its
tokenizer with each image token written N times, N the visual tokens asked for."""

from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature


def _count_images(images) -> int:
  """Images in what an image processor takes: one image (PIL, [H, W, C] or [C, H, W]),
  a batch array [I, ...], or (nested) lists of them."""
  if images is None:
    return 0
  if isinstance(images, (list, tuple)):
    return sum(_count_images(x) for x in images)
  return images.shape[0] if getattr(images, "ndim", 0) == 4 else 1


class TokenFlexProcessor(ProcessorMixin):
  """``processor(images=..., text=..., num_visual_tokens=N)`` -> input_ids and
  attention_mask (left-padded) and pixel_values [I, 3, H, W], ready for the model's
  forward and generate. Each text holds one image token per image, in the order of
  ``images`` (ValueError if the counts differ)."""

  def __init__(self, image_processor=None, tokenizer=None, chat_template=None,
               num_visual_tokens=256, image_token="<image>", **kwargs):
    self.num_visual_tokens = num_visual_tokens
    self.image_token = image_token
    super().__init__(image_processor, tokenizer, chat_template=chat_template)

  def __call__(self, images=None, text=None, num_visual_tokens=None, return_tensors="pt",
               **kwargs):
    n = num_visual_tokens or self.num_visual_tokens
    texts = [text] if isinstance(text, str) else list(text or [])
    markers = sum(t.count(self.image_token) for t in texts)
    given = _count_images(images)
    if markers != given:
      raise ValueError(f"{given} image(s) but {markers} {self.image_token} marker(s) in the "
                       f"text: write one {self.image_token} per image, in the order of images")
    texts = [t.replace(self.image_token, self.image_token * n) for t in texts]
    data = dict(self.tokenizer(texts, padding=True, padding_side="left",
                               add_special_tokens=False, return_tensors=return_tensors))
    if images is not None:
      data.update(self.image_processor(images, return_tensors=return_tensors))
    return BatchFeature(data, tensor_type=return_tensors)

  def batch_decode(self, *args, **kwargs):
    return self.tokenizer.batch_decode(*args, **kwargs)

  def decode(self, *args, **kwargs):
    return self.tokenizer.decode(*args, **kwargs)


__all__ = ["TokenFlexProcessor"]
