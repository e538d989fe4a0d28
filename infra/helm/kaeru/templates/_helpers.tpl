{{- define "kaeru.secretName" -}}
{{- .Values.existingSecret | default (printf "%s-settings" .Release.Name) -}}
{{- end -}}

{{- define "kaeru.env" -}}
envFrom:
  - configMapRef:
      name: {{ .Release.Name }}-settings
  - secretRef:
      name: {{ include "kaeru.secretName" . }}
{{- end -}}
