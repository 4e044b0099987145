"""An offline multi-task merging benchmark built from scikit-learn's handwritten digits."""
