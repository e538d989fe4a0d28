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

{{- define "kaeru.mounts" -}}
{{- with .Values.extraVolumeMounts }}
volumeMounts:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "kaeru.volumes" -}}
{{- with .Values.extraVolumes }}
volumes:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
