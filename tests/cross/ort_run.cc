// ort_run LIBRARY MODEL DIR THREADS: runs MODEL once in ONNX Runtime's C API with the op library
// LIBRARY registered, inputs from DIR/in_<name>.npy, outputs to DIR/out_<name>.npy. Built for
// another CPU (tests/cross/check.py runs it under an emulator there), so that the op library's
// kernels for that CPU run inside a real ONNX Runtime without a Python for it. Exit 0: ran;
// 2: ONNX Runtime returned an error (printed on stderr); 1: bad arguments or files.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "onnxruntime_cxx_api.h"

namespace {

struct Npy {
  std::string descr;  // numpy dtype string, e.g. "<f4"
  std::vector<int64_t> shape;
  std::vector<char> data;
};

struct DType {
  const char* descr;
  ONNXTensorElementDataType type;
  size_t bytes;
};

constexpr DType kTypes[] = {
    {"<f4", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 4},   {"<f2", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, 2},
    {"<i8", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 8},   {"<i4", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, 4},
    {"|u1", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 1},   {"|i1", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, 1},
    {"|b1", ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL, 1},
};

const DType& ByDescr(const std::string& d) {
  for (const DType& t : kTypes)
    if (d == t.descr) return t;
  throw std::runtime_error("unsupported npy dtype " + d);
}

const DType& ByType(ONNXTensorElementDataType type) {
  for (const DType& t : kTypes)
    if (type == t.type) return t;
  throw std::runtime_error("unsupported output element type " + std::to_string(type));
}

std::string Field(const std::string& header, const std::string& key) {
  const size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error("npy header without " + key);
  return header.substr(header.find(':', at) + 1);
}

Npy ReadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[8];
  f.read(magic, 8);
  if (std::string(magic, 6) != "\x93NUMPY") throw std::runtime_error(path + ": not an npy file");
  uint32_t len = 0;
  if (magic[6] == 1) {
    uint16_t l16 = 0;
    f.read(reinterpret_cast<char*>(&l16), 2);
    len = l16;
  } else {
    f.read(reinterpret_cast<char*>(&len), 4);
  }
  std::string header(len, ' ');
  f.read(header.data(), len);
  Npy npy;
  std::string descr = Field(header, "descr");
  npy.descr = descr.substr(descr.find('\'') + 1, 3);
  if (Field(header, "fortran_order").find("False") == std::string::npos)
    throw std::runtime_error(path + ": fortran order");
  std::string shape = Field(header, "shape");
  shape = shape.substr(shape.find('(') + 1, shape.find(')') - shape.find('(') - 1);
  std::stringstream ss(shape);
  for (std::string item; std::getline(ss, item, ',');)
    if (item.find_first_not_of(' ') != std::string::npos) npy.shape.push_back(std::stoll(item));
  size_t count = 1;
  for (int64_t s : npy.shape) count *= static_cast<size_t>(s);
  npy.data.resize(count * ByDescr(npy.descr).bytes);
  f.read(npy.data.data(), static_cast<std::streamsize>(npy.data.size()));
  if (!f) throw std::runtime_error(path + ": truncated");
  return npy;
}

void WriteNpy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape,
              const void* data, size_t bytes) {
  std::string dims;
  for (int64_t s : shape) dims += std::to_string(s) + ",";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  const uint16_t len = static_cast<uint16_t>(header.size());
  f.write("\x93NUMPY\x01\x00", 8);
  f.write(reinterpret_cast<const char*>(&len), 2);
  f << header;
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!f) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: ort_run LIBRARY MODEL DIR THREADS\n";
    return 1;
  }
  const std::string library = argv[1], model = argv[2], dir = argv[3];
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "ort_run");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(std::stoi(argv[4]));
    options.RegisterCustomOpsLibrary(library.c_str());
    Ort::Session session(env, model.c_str(), options);
    Ort::AllocatorWithDefaultOptions allocator;
    Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<std::string> in_names, out_names;
    std::vector<Npy> arrays;
    std::vector<Ort::Value> values;
    for (size_t i = 0; i < session.GetInputCount(); ++i) {
      in_names.push_back(session.GetInputNameAllocated(i, allocator).get());
      arrays.push_back(ReadNpy(dir + "/in_" + in_names.back() + ".npy"));
    }
    for (Npy& a : arrays) {
      values.push_back(Ort::Value::CreateTensor(cpu, a.data.data(), a.data.size(), a.shape.data(), a.shape.size(),
                                                ByDescr(a.descr).type));
    }
    for (size_t i = 0; i < session.GetOutputCount(); ++i)
      out_names.push_back(session.GetOutputNameAllocated(i, allocator).get());
    std::vector<const char*> in_ptrs, out_ptrs;
    for (const std::string& n : in_names) in_ptrs.push_back(n.c_str());
    for (const std::string& n : out_names) out_ptrs.push_back(n.c_str());
    std::vector<Ort::Value> outputs;
    try {
      outputs = session.Run(Ort::RunOptions{nullptr}, in_ptrs.data(), values.data(), values.size(), out_ptrs.data(),
                            out_ptrs.size());
    } catch (const Ort::Exception& e) {
      std::cerr << "onnxruntime: " << e.what() << "\n";
      return 2;
    }
    for (size_t i = 0; i < outputs.size(); ++i) {
      Ort::TensorTypeAndShapeInfo info = outputs[i].GetTensorTypeAndShapeInfo();
      const DType& t = ByType(info.GetElementType());
      WriteNpy(dir + "/out_" + out_names[i] + ".npy", t.descr, info.GetShape(), outputs[i].GetTensorRawData(),
               info.GetElementCount() * t.bytes);
    }
  } catch (const Ort::Exception& e) {
    std::cerr << "onnxruntime: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "ort_run: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
