"""MLflow "model from code" for the project's torch models (logged by model_store.log_model).

MLflow runs this file to load the model: it rebuilds the architecture from `spec.json` and
reads `weights.pt` with `torch.load(weights_only=True)`, so loading never unpickles code.
predict(): a 2-D float array, a DataFrame of numeric columns, or one column holding an array per
row (as `mlflow.pyfunc.spark_udf` passes an array<float> column) -> embeddings: old embeddings
for `h` (with an uncertainty head, the last output column is sigma), flattened square
grayscale images otherwise.
"""
import mlflow
from mlflow.pyfunc import PythonModel


class TorchStateDictModel(PythonModel):
    def load_context(self, context):
        from fastfill_udfs.model_store import load_model_dir

        self.model = load_model_dir(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        from fastfill_udfs.models import Transformation, sigma_from_s

        rows = model_input
        if hasattr(rows, "columns") and len(rows.columns) == 1 and rows.dtypes.iloc[0] == object:
            rows = np.stack([np.asarray(v, dtype=np.float32) for v in rows.iloc[:, 0]])
        x = torch.from_numpy(np.asarray(rows, dtype=np.float32))
        with torch.inference_mode():
            if isinstance(self.model, Transformation):
                emb, s = self.model(x)
                if self.model.has_uncertainty:
                    emb = torch.cat([emb, sigma_from_s(s)[:, None]], dim=1)
                return emb.numpy()
            side = int(round(x.shape[1] ** 0.5))
            return self.model.embed(x.reshape(-1, 1, side, side)).numpy()


mlflow.models.set_model(TorchStateDictModel())
