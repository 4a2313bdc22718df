"""Networks: generators, ratio networks (classifiers with a scalar logit) and score networks."""
