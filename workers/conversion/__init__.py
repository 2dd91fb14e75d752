"""Model conversion, kept out of the runtime engines: FaceNet's TensorFlow graph (a GraphDef, read by
``tf_graphdef`` without TensorFlow) converted to ONNX (``tf_to_onnx``) once, by ``quorum models
convert-facenet`` or by the FaceNet engine on first use when no converted model is cached."""
