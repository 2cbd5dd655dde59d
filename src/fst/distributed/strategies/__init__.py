"""The two ways ranks load their tensors: by collectives (`collective`), or each from the page
cache they share (`local`)."""
