"""The shape of the representation h that an encoder gives, for any Keras model.

Functional models know their output, but a Sequential model or a subclassed `keras.Model` has none
until it is called (`encoder.output` raises), and `compute_output_shape` is not implemented by
subclassed models. A symbolic call on a `keras.KerasTensor` of the views' shape works for all of
them: it builds the encoder if needed (as Keras' own "build by run" does) and creates no tensors.
"""

import keras

POOLING_HINT = "end it with keras.layers.GlobalAveragePooling2D() (pooling='avg' for keras.applications)"


def first_line(error):
    """"TypeName: first line of the message", for one-line errors that quote another."""
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def views_shape(augmenter):
    """(None, H, W, 3): the shape of the views `augmenter` gives (`SimCLRAugmentation`, or any layer);
    (None, None, None, 3) for a layer that does not say (no `compute_output_shape`)."""
    try:
        return (None, *tuple(augmenter.compute_output_shape((None, None, None, 3)))[1:])
    except NotImplementedError:
        return (None, None, None, 3)


def representation_shape(encoder, views_shape):
    """(None, D): the shape of h from `encoder` on float views of `views_shape`; builds the encoder.

    Raises ValueError (one line naming the fix) when the encoder cannot take such views, or when what
    it returns is not one [batch, D] tensor with D known.
    """
    views_shape = (None, *tuple(views_shape)[1:])
    name = getattr(encoder, "name", type(encoder).__name__)
    try:
        output = encoder(keras.KerasTensor(views_shape, dtype="float32"))
    except Exception as error:  # Keras raises ValueError, TypeError, NotImplementedError, ...
        raise ValueError(
            f"encoder {name} cannot take the augmenter's views of shape {views_shape} ({first_line(error)}); give it "
            f"inputs of shape {views_shape[1:]} (keras.Input or input_shape=), or an augmenter of its image size."
        ) from None
    shape = tuple(output.shape) if isinstance(output, keras.KerasTensor) else None
    if shape is None or len(shape) != 2 or shape[-1] is None:
        received = shape if shape is not None else type(output).__name__
        raise ValueError(
            f"encoder {name} returns {received} for views of shape {views_shape}, where the representation h "
            f"must be one tensor [batch, D] with D known: {POOLING_HINT}."
        )
    return (None, int(shape[-1]))
