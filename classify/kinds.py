"""Names of the head kinds, importable without scikit-learn (the CLI builds its choices from them).

The order is the tie-break of ``fit-head --kind all``: on equal cross-validation accuracy the
first listed wins, and they are listed cheapest at the edge first (one dense layer, then two,
then a kernel over the support vectors).
"""

KIND_NAMES = ("svm", "softmax", "mlp", "rbf")
KIND_CHOICES = (*KIND_NAMES, "all")
