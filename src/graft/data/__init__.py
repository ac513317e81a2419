"""Images in: finding them (either layout), decoding them safely, splits, transforms, decoded
datasets, public example sets."""
