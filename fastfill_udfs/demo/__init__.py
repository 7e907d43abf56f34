"""The Fashion-MNIST demo, one user of the pipeline: its data protocol (`protocol`), the old and
new CNNs it updates between (`cnn`), the in-memory study that trains them and compares orders
(`study`, `study_job`) and the one-command run (`run`). Nothing on a user's path imports it: a
user brings a gallery table with old embeddings, a new model and `h` as MLflow URIs."""
