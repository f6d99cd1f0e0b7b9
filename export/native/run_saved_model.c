/*
 * Loads a SavedModel with TensorFlow's C API and runs one set of tensors
 * through it, with no Python in the process.
 *
 * TF_LoadSessionFromSavedModel is the loader TensorFlow Serving uses: it
 * restores the variables and runs the SavedModel's init ops, so an export
 * that needs Python, a missing op library or a resource captured from Python
 * fails here as it would in the server.
 *
 * Usage:
 *   run_saved_model EXPORT_DIR [--tag TAG]... [--library SO]...
 *       [--input OP:INDEX FILE]... [--output OP:INDEX FILE]...
 *
 * --tag defaults to "serve". Each --library is loaded with TF_LoadLibrary
 * before the model (custom ops, e.g. tf-text's SentencePiece kernels). The
 * input and output names are graph tensors ("serving_default_images:0"),
 * read by the caller from the SavedModel's SignatureDefs.
 *
 * Tensor files, little-endian: "KMT1", int32 dtype (TF_DataType), int32
 * rank, int64 dims[rank], then the elements: raw bytes for numeric types;
 * for TF_STRING, each element as a uint64 byte count and its bytes.
 *
 * Exit status: 0 on success; 1 with a message on stderr otherwise.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensorflow/c/c_api.h"

#define MAX_ITEMS 64

static void die(const char* what, const char* detail) {
  fprintf(stderr, "run_saved_model: %s%s%s\n", what, detail ? ": " : "",
          detail ? detail : "");
  exit(1);
}

static void check(TF_Status* status, const char* what) {
  if (TF_GetCode(status) != TF_OK) die(what, TF_Message(status));
}

static void read_exact(FILE* f, void* out, size_t size, const char* path) {
  if (size && fread(out, 1, size, f) != size) die("truncated tensor file", path);
}

static TF_Tensor* read_tensor(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) die("cannot open tensor file", path);
  char magic[4];
  int32_t dtype, rank;
  read_exact(f, magic, 4, path);
  if (memcmp(magic, "KMT1", 4) != 0) die("not a tensor file", path);
  read_exact(f, &dtype, sizeof dtype, path);
  read_exact(f, &rank, sizeof rank, path);
  if (rank < 0 || rank > 16) die("bad rank in tensor file", path);
  int64_t dims[16];
  int64_t count = 1;
  read_exact(f, dims, sizeof(int64_t) * rank, path);
  for (int i = 0; i < rank; ++i) count *= dims[i];
  TF_Tensor* tensor;
  if (dtype == TF_STRING) {
    tensor = TF_AllocateTensor(TF_STRING, dims, rank,
                               sizeof(TF_TString) * (size_t)count);
    TF_TString* items = (TF_TString*)TF_TensorData(tensor);
    for (int64_t i = 0; i < count; ++i) {
      uint64_t size;
      read_exact(f, &size, sizeof size, path);
      char* bytes = (char*)malloc(size ? size : 1);
      read_exact(f, bytes, size, path);
      TF_StringInit(&items[i]);
      TF_StringCopy(&items[i], bytes, size);
      free(bytes);
    }
  } else {
    size_t item = TF_DataTypeSize((TF_DataType)dtype);
    if (item == 0) die("unsupported dtype in tensor file", path);
    tensor = TF_AllocateTensor((TF_DataType)dtype, dims, rank,
                               item * (size_t)count);
    read_exact(f, TF_TensorData(tensor), item * (size_t)count, path);
  }
  fclose(f);
  return tensor;
}

static void write_tensor(const char* path, const TF_Tensor* tensor) {
  FILE* f = fopen(path, "wb");
  if (!f) die("cannot write", path);
  int32_t dtype = (int32_t)TF_TensorType(tensor);
  int32_t rank = TF_NumDims(tensor);
  int64_t count = TF_TensorElementCount(tensor);
  fwrite("KMT1", 1, 4, f);
  fwrite(&dtype, sizeof dtype, 1, f);
  fwrite(&rank, sizeof rank, 1, f);
  for (int i = 0; i < rank; ++i) {
    int64_t dim = TF_Dim(tensor, i);
    fwrite(&dim, sizeof dim, 1, f);
  }
  if (dtype == TF_STRING) {
    const TF_TString* items = (const TF_TString*)TF_TensorData(tensor);
    for (int64_t i = 0; i < count; ++i) {
      uint64_t size = TF_StringGetSize(&items[i]);
      fwrite(&size, sizeof size, 1, f);
      fwrite(TF_StringGetDataPointer(&items[i]), 1, size, f);
    }
  } else {
    fwrite(TF_TensorData(tensor), 1, TF_TensorByteSize(tensor), f);
  }
  if (fclose(f) != 0) die("cannot write", path);
}

static TF_Output find_output(TF_Graph* graph, const char* name) {
  char op_name[512];
  const char* colon = strrchr(name, ':');
  size_t length = colon ? (size_t)(colon - name) : strlen(name);
  if (length >= sizeof op_name) die("tensor name too long", name);
  memcpy(op_name, name, length);
  op_name[length] = '\0';
  TF_Operation* op = TF_GraphOperationByName(graph, op_name);
  if (!op) die("no such operation in the graph", op_name);
  TF_Output out = {op, colon ? atoi(colon + 1) : 0};
  return out;
}

int main(int argc, char** argv) {
  if (argc < 2) die("usage: run_saved_model EXPORT_DIR [options]", NULL);
  const char* export_dir = argv[1];
  const char* tags[MAX_ITEMS];
  const char* input_names[MAX_ITEMS];
  const char* input_files[MAX_ITEMS];
  const char* output_names[MAX_ITEMS];
  const char* output_files[MAX_ITEMS];
  int num_tags = 0, num_inputs = 0, num_outputs = 0;
  TF_Status* status = TF_NewStatus();
  for (int i = 2; i < argc; ++i) {
    if (!strcmp(argv[i], "--tag") && i + 1 < argc) {
      if (num_tags == MAX_ITEMS) die("too many tags", NULL);
      tags[num_tags++] = argv[++i];
    } else if (!strcmp(argv[i], "--library") && i + 1 < argc) {
      TF_Library* library = TF_LoadLibrary(argv[++i], status);
      check(status, "TF_LoadLibrary failed");
      TF_DeleteLibraryHandle(library);
    } else if (!strcmp(argv[i], "--input") && i + 2 < argc) {
      if (num_inputs == MAX_ITEMS) die("too many inputs", NULL);
      input_names[num_inputs] = argv[++i];
      input_files[num_inputs++] = argv[++i];
    } else if (!strcmp(argv[i], "--output") && i + 2 < argc) {
      if (num_outputs == MAX_ITEMS) die("too many outputs", NULL);
      output_names[num_outputs] = argv[++i];
      output_files[num_outputs++] = argv[++i];
    } else {
      die("unknown or incomplete argument", argv[i]);
    }
  }
  if (num_tags == 0) tags[num_tags++] = "serve";

  TF_Graph* graph = TF_NewGraph();
  TF_SessionOptions* options = TF_NewSessionOptions();
  TF_Session* session = TF_LoadSessionFromSavedModel(
      options, NULL, export_dir, tags, num_tags, graph, NULL, status);
  check(status, "TF_LoadSessionFromSavedModel failed");

  TF_Output inputs[MAX_ITEMS], outputs[MAX_ITEMS];
  TF_Tensor* input_values[MAX_ITEMS];
  TF_Tensor* output_values[MAX_ITEMS];
  for (int i = 0; i < num_inputs; ++i) {
    inputs[i] = find_output(graph, input_names[i]);
    input_values[i] = read_tensor(input_files[i]);
  }
  for (int i = 0; i < num_outputs; ++i) {
    outputs[i] = find_output(graph, output_names[i]);
    output_values[i] = NULL;
  }
  TF_SessionRun(session, NULL, inputs, input_values, num_inputs, outputs,
                output_values, num_outputs, NULL, 0, NULL, status);
  check(status, "TF_SessionRun failed");
  for (int i = 0; i < num_outputs; ++i) {
    write_tensor(output_files[i], output_values[i]);
    TF_DeleteTensor(output_values[i]);
  }
  for (int i = 0; i < num_inputs; ++i) TF_DeleteTensor(input_values[i]);
  TF_CloseSession(session, status);
  check(status, "TF_CloseSession failed");
  TF_DeleteSession(session, status);
  TF_DeleteSessionOptions(options);
  TF_DeleteGraph(graph);
  TF_DeleteStatus(status);
  return 0;
}
