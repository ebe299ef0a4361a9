"""torchvision ResNet / ShuffleNetV2 and timm VisionTransformer rebuilt from torch.nn only.

Neither torchvision nor timm is installed here, so these copy their layer
definitions (and state-dict key names) faithfully, for output-parity tests
of `jaxdml.models`. Random weights, random BatchNorm running statistics.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- torchvision.models.resnet ----
class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    idt = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + idt)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    idt = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + idt)


class ResNet(nn.Module):
  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], 2)
    self.layer3 = self._make_layer(block, 256, layers[2], 2)
    self.layer4 = self._make_layer(block, 512, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(name):
  return {"resnet18": lambda: ResNet(BasicBlock, [2, 2, 2, 2]),
          "resnet34": lambda: ResNet(BasicBlock, [3, 4, 6, 3]),
          "resnet50": lambda: ResNet(Bottleneck, [3, 4, 6, 3]),
          "resnet101": lambda: ResNet(Bottleneck, [3, 4, 23, 3])}[name]()


# ---- torchvision.models.shufflenetv2 ----
def channel_shuffle(x, groups):
  b, c, h, w = x.size()
  x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
  return x.view(b, -1, h, w)


class InvertedResidual(nn.Module):
  def __init__(self, inp, oup, stride):
    super().__init__()
    self.stride = stride
    bf = oup // 2
    if stride > 1:
      self.branch1 = nn.Sequential(
          nn.Conv2d(inp, inp, 3, stride, 1, bias=False, groups=inp), nn.BatchNorm2d(inp),
          nn.Conv2d(inp, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True))
    else:
      self.branch1 = nn.Sequential()
    self.branch2 = nn.Sequential(
        nn.Conv2d(inp if stride > 1 else bf, bf, 1, bias=False), nn.BatchNorm2d(bf),
        nn.ReLU(inplace=True),
        nn.Conv2d(bf, bf, 3, stride, 1, bias=False, groups=bf), nn.BatchNorm2d(bf),
        nn.Conv2d(bf, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True))

  def forward(self, x):
    if self.stride == 1:
      x1, x2 = x.chunk(2, dim=1)
      out = torch.cat((x1, self.branch2(x2)), dim=1)
    else:
      out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
    return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
  def __init__(self, stages_repeats, stages_out_channels, num_classes=1000):
    super().__init__()
    inp = 3
    out = stages_out_channels[0]
    self.conv1 = nn.Sequential(nn.Conv2d(inp, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out),
                               nn.ReLU(inplace=True))
    inp = out
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    for name, repeats, out in zip(["stage2", "stage3", "stage4"], stages_repeats,
                                  stages_out_channels[1:]):
      seq = [InvertedResidual(inp, out, 2)] + [InvertedResidual(out, out, 1)
                                               for _ in range(repeats - 1)]
      setattr(self, name, nn.Sequential(*seq))
      inp = out
    out = stages_out_channels[-1]
    self.conv5 = nn.Sequential(nn.Conv2d(inp, out, 1, bias=False), nn.BatchNorm2d(out),
                               nn.ReLU(inplace=True))
    self.fc = nn.Linear(out, num_classes)

  def forward(self, x):
    x = self.maxpool(self.conv1(x))
    x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
    return self.fc(x.mean([2, 3]))


def shufflenet(name):
  ch = {"shufflenet_v2_x0_5": [24, 48, 96, 192, 1024],
        "shufflenet_v2_x1_0": [24, 116, 232, 464, 1024]}[name]
  return ShuffleNetV2([4, 8, 4], ch)


# ---- timm.models.vision_transformer (class token, no fc_norm, no layer scale) ----
class Attention(nn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, dim * 4)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
  def __init__(self, img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3,
               num_classes=1000):
    super().__init__()
    self.patch_embed = PatchEmbed(patch_size, embed_dim)
    n = (img_size // patch_size) ** 2
    self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, n + 1, embed_dim) * 0.02)
    self.blocks = nn.Sequential(*[Block(embed_dim, num_heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Linear(embed_dim, num_classes)

  def forward(self, x):
    x = self.patch_embed(x)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    return self.head(self.norm(self.blocks(x))[:, 0])


def resample_abs_pos_embed(posemb, new_size, num_prefix_tokens=1):
  """timm.layers.resample_abs_pos_embed (bicubic, antialias=True)."""
  d = posemb.shape[-1]
  prefix, posemb = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
  old = int(posemb.shape[1] ** 0.5)
  posemb = posemb.reshape(1, old, old, d).permute(0, 3, 1, 2)
  posemb = F.interpolate(posemb, size=new_size, mode="bicubic", antialias=True)
  posemb = posemb.permute(0, 2, 3, 1).reshape(1, -1, d)
  return torch.cat([prefix, posemb], dim=1)


def randomize(model, seed=0):
  """Random weights and BatchNorm running statistics (so eval mode is not the identity)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, nn.LayerNorm):
        m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
      elif isinstance(m, nn.Linear) and m.bias is not None:
        m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
  return model.eval()


def state_dict_numpy(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def forward_nhwc(model, images: np.ndarray) -> np.ndarray:
  """torch forward on NHWC numpy images (float32), eval mode."""
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).numpy()
